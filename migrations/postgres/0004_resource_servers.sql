-- The audiences a resource_server workload serves (space-separated URLs); empty for others.
ALTER TABLE workloads ADD COLUMN audiences TEXT NOT NULL DEFAULT '';
