-- The key that signs JWT-SVIDs: ES256, which the SPIFFE JWT-SVID profile requires (task tokens
-- keep their own keyring). Its PKCS#8 is sealed under the master key, bound to the id. Replicas
-- starting together all store the same id; the first insert wins, so all sign with one key.
CREATE TABLE jwt_svid_keys (
    id                  TEXT PRIMARY KEY,
    sealed_private_key  BLOB NOT NULL,
    created_at          INTEGER NOT NULL
);
