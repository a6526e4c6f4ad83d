//! Durability under power loss, not only under a killed process: the real broker runs with its
//! SQLite file on a filesystem that loses every write not yet flushed to its disk
//! ([`LossyDisk`]). Credentials are issued under load, the power is cut (the broker killed and
//! every unsynced write dropped), the filesystem mounted again and the broker restarted: every
//! credential a client received must still be valid, and revocable.
//!
//! The same run with the broker's durability switched off (`synchronous=OFF`, possible only in
//! test builds) must lose credentials: that shows the test can fail.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use warrant::client::Connection;
use warrant::proto;

use crate::lossy_fs::LossyDisk;
use crate::process::{BrokerProcess, free_address};
use crate::support::*;

const AUDIENCE: &str = "https://crm.example.internal";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_credential_received_survives_a_power_cut() {
    let Some(outcome) = issue_then_cut_power(&[]).await else {
        return;
    };
    eprintln!("power cut with durable commits: {outcome:?}");

    assert!(outcome.received > 20, "enough load to matter: {outcome:?}");
    assert!(
        outcome.unsynced_at_cut > 0,
        "the cut dropped writes: {outcome:?}"
    );
    assert_eq!(
        outcome.lost, 0,
        "credentials lost by the power cut: {outcome:?}"
    );
    assert_eq!(
        outcome.revoked, outcome.received,
        "and every one is still revocable"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_power_cut_loses_credentials_when_commits_are_not_flushed() {
    let Some(outcome) = issue_then_cut_power(&[("WARRANT_TEST_SQLITE_SYNCHRONOUS", "OFF")]).await
    else {
        return;
    };
    eprintln!("power cut with synchronous=OFF: {outcome:?}");

    assert!(outcome.received > 20, "{outcome:?}");
    assert!(
        outcome.lost > 0,
        "without flushes the cut must lose credentials: {outcome:?}"
    );
}

#[derive(Debug)]
struct Outcome {
    received: usize,
    unsynced_at_cut: usize,
    lost: usize,
    revoked: usize,
}

/// Runs a broker on a lossy disk (with `extra_env`), issues credentials from 16 clients, cuts
/// the power in the middle of it, restarts a normal broker on what the disk kept, and counts
/// the received credentials it no longer honours. `None` (the caller skips) when FUSE cannot
/// be mounted here; under CI that fails the test instead, so the check always runs there.
async fn issue_then_cut_power(extra_env: &[(&str, &str)]) -> Option<Outcome> {
    let dir = tempfile::tempdir().unwrap();
    let mountpoint = dir.path().join("disk");
    std::fs::create_dir(&mountpoint).unwrap();
    let disk = LossyDisk::new();
    let session = match disk.mount(&mountpoint) {
        Ok(session) => session,
        Err(error) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must be able to mount the lossy filesystem: {error}"
            );
            eprintln!(
                "skipped: cannot mount a FUSE filesystem here ({error}); needs root and /dev/fuse"
            );
            return None;
        }
    };
    let data_dir = mountpoint.join("warrant-data");
    let addresses = (free_address(), free_address());
    let on = (addresses.0.as_str(), addresses.1.as_str());
    // The FUSE disk holds no sockets: the local attestation socket lives beside it.
    let socket = dir.path().join("warrant.sock");
    let socket = socket.to_str().unwrap();
    let mut env = vec![("WARRANT_UNIX_SOCKET", socket)];
    env.extend_from_slice(extra_env);

    let mut broker =
        BrokerProcess::start_in(&["serve", "--dev"], dir.path(), &data_dir, "info", on, &env);
    let (grpc, _) = broker.wait_until_serving();
    let address = format!("http://{grpc}");
    let admin_credential = broker.admin_credential().expect("admin credential");
    let admin = Connection::open(&address, Some(&admin_credential), None)
        .await
        .unwrap();
    let agent_credential = admin
        .admin()
        .create_workload(proto::CreateWorkloadRequest {
            name: "crm-agent".into(),
            roles: vec![proto::Role::Agent as i32],
            audiences: Vec::new(),
            no_bearer_credential: false,
            selectors: Vec::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .credential;
    let agent = Connection::open(&address, Some(&agent_credential), None)
        .await
        .unwrap();

    let received = Arc::new(Mutex::new(Vec::new()));
    let load_until = Instant::now() + Duration::from_millis(1500);
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let (mut tasks, received) = (agent.tasks(), received.clone());
            tokio::spawn(async move {
                while Instant::now() < load_until + Duration::from_secs(1) {
                    match tasks.begin_task(begin(&["crm.contacts:read"])).await {
                        Ok(response) => received.lock().unwrap().push(response.into_inner()),
                        Err(_) => return,
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep_until(load_until.into()).await;
    // The power fails: the broker stops mid-load and the disk keeps only what was flushed.
    broker.child.kill().unwrap();
    broker.child.wait().unwrap();
    let unsynced_at_cut = disk.unsynced_bytes();
    disk.cut_power();
    for client in clients {
        let _ = client.await;
    }
    drop(broker);
    session.umount_and_join().expect("unmount");
    let received = std::mem::take(&mut *received.lock().unwrap());

    let _session = disk.mount(&mountpoint).expect("mount the disk again");
    let mut restarted = BrokerProcess::start_in(
        &["serve", "--dev"],
        dir.path(),
        &data_dir,
        "info",
        on,
        &env[..1],
    );
    let (grpc, _) = restarted.wait_until_serving();
    let address = format!("http://{grpc}");
    let mut tokens = Connection::open(&address, Some(&admin_credential), None)
        .await
        .unwrap()
        .tokens();
    let mut tasks = Connection::open(&address, Some(&agent_credential), None)
        .await
        .unwrap()
        .tasks();
    let (mut lost, mut revoked) = (0, 0);
    for task in &received {
        let introspection = proto::IntrospectRequest {
            token: task.leases[0].credential.clone(),
            audience: AUDIENCE.into(),
            ..Default::default()
        };
        let is_honoured = tokens
            .introspect(introspection.clone())
            .await
            .is_ok_and(|response| response.into_inner().active);
        if !is_honoured {
            lost += 1;
            continue;
        }
        let completed = tasks
            .complete_task(complete_request(&task.task_id))
            .await
            .unwrap()
            .into_inner();
        let is_inactive = !tokens
            .introspect(introspection)
            .await
            .unwrap()
            .into_inner()
            .active;
        if completed.revoked_lease_ids == [task.leases[0].lease_id.clone()] && is_inactive {
            revoked += 1;
        }
    }
    Some(Outcome {
        received: received.len(),
        unsynced_at_cut,
        lost,
        revoked,
    })
}
