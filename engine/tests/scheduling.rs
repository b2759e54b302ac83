//! How a running server's threads are scheduled, as the kernel reports it
//! in /proc: the alert path (MQTT worker, log writer, dataflow workers,
//! alert thread) in the real-time class, background work below it, and
//! the `scheduling.alert_path` setting honoured.

#![cfg(target_os = "linux")]

mod common;

use common::*;

/// One thread of a process: its name, scheduling policy and nice value
/// (/proc/PID/task/TID/stat: fields 19 and 41, counted from 1).
#[derive(Debug)]
struct Task {
    name: String,
    policy: u32,
    nice: i64,
}

const SCHED_OTHER: u32 = 0;
const SCHED_FIFO: u32 = 1;

fn tasks(pid: u32) -> Vec<Task> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc") {
        let Ok(stat) = std::fs::read_to_string(entry.unwrap().path().join("stat")) else {
            continue; // the thread ended meanwhile
        };
        // The name is in parentheses and may hold spaces; fields follow.
        let open = stat.find('(').unwrap();
        let close = stat.rfind(')').unwrap();
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        // fields[0] is field 3 (state).
        out.push(Task {
            name: stat[open + 1..close].to_string(),
            nice: fields[19 - 3].parse().unwrap(),
            policy: fields[41 - 3].parse().unwrap(),
        });
    }
    out
}

fn named<'a>(tasks: &'a [Task], prefix: &str) -> Vec<&'a Task> {
    tasks
        .iter()
        .filter(|t| t.name.starts_with(prefix))
        .collect()
}

/// Whether this process may use the real-time class (root, CAP_SYS_NICE
/// or RLIMIT_RTPRIO), asked of the kernel on a thread of its own.
fn realtime_permitted() -> bool {
    std::thread::spawn(|| {
        let param = libc::sched_param { sched_priority: 1 };
        // SAFETY: pid 0 is this short-lived thread; param outlives the call.
        unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) == 0 }
    })
    .join()
    .unwrap()
}

#[test]
fn the_alert_path_runs_ahead_of_background_work() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut server = Server::start(&dir, &["--workers", "2", "--mqtt-io-threads", "1"]);
    let threads = tasks(server.child.id());
    let metrics = server.metrics();
    // Two dataflow workers, one MQTT worker, the log writer, the alert thread.
    let on_path = 5.0;

    if realtime_permitted() {
        assert_eq!(
            metric(
                &metrics,
                "wardflow_alert_path_threads{scheduling=\"realtime\"}"
            ),
            Some(on_path),
            "{metrics}"
        );
        for name in ["wal-writer", "alerts", "timely:work-0", "timely:work-1"] {
            let t = named(&threads, name);
            assert_eq!(t.len(), 1, "{name}: {threads:?}");
            assert_eq!(t[0].policy, SCHED_FIFO, "{name}: {threads:?}");
        }
        // The MQTT worker shares its name with the HTTP worker, which stays
        // in the normal class.
        let net: Vec<_> = named(&threads, "wardflow-net:wo")
            .into_iter()
            .map(|t| t.policy)
            .collect();
        assert_eq!(
            net.iter().filter(|&&p| p == SCHED_FIFO).count(),
            1,
            "{threads:?}"
        );
        assert!(net.contains(&SCHED_OTHER), "{threads:?}");
        assert_eq!(
            threads.iter().filter(|t| t.policy == SCHED_FIFO).count(),
            on_path as usize,
            "only the alert path is real-time: {threads:?}"
        );
    } else {
        // Refused: a short slice instead, and the log says why.
        assert_eq!(
            metric(
                &metrics,
                "wardflow_alert_path_threads{scheduling=\"short-slice\"}"
            ),
            Some(on_path),
            "{metrics}"
        );
        assert!(
            server
                .log_text()
                .contains("cannot run in the real-time class")
        );
    }
    // Background threads step back, in the normal class: flushes (started
    // by the real-time dataflow workers), compaction, the ledger, log
    // segments; the alert log's fsync and the syncer's stay at nice 0.
    for (name, nice) in [
        ("flush-", 10),
        ("housekeeping", 10),
        ("ledger", 10),
        ("wal-helper", 10),
        ("wal-syncer", 0),
        ("alert-log", 0),
    ] {
        let t = named(&threads, name);
        assert!(!t.is_empty(), "{name}: {threads:?}");
        for t in t {
            assert_eq!((t.policy, t.nice), (SCHED_OTHER, nice), "{t:?}");
        }
    }
    server.stop();

    // `normal` leaves every thread in the normal class.
    let mut server = Server::start(
        &dir,
        &["--workers", "2", "--alert-path-scheduling", "normal"],
    );
    let threads = tasks(server.child.id());
    assert!(
        threads.iter().all(|t| t.policy == SCHED_OTHER),
        "{threads:?}"
    );
    assert_eq!(
        metric(
            &server.metrics(),
            "wardflow_alert_path_threads{scheduling=\"normal\"}"
        ),
        Some(on_path)
    );
    server.stop();
}
