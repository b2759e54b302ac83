//! Scheduling: the threads on a publish's way to its alert (the MQTT
//! workers, the write-ahead log's writer, the dataflow workers, the alert
//! thread) run ahead of work that can wait, and background threads
//! (Parquet encoding, compaction, preparing log segments, the audit
//! ledger's hashing) yield the CPU and the disk to them.
//!
//! By default the alert path runs in the real-time class (`SCHED_FIFO` at
//! priority 1, the lowest): a woken alert-path thread preempts every
//! normal thread at once, where a nice value only weighs shares and, under
//! EEVDF, lets a thread that had its share wait milliseconds behind a
//! background one. IEC 60601-1-8 counts the alarm signal generation delay
//! (from an alarm condition to its signal) against the alarm system; on a
//! busy 2-core machine at half the maximum ingest rate, the real-time
//! class took the alert latency benchmark's p99 from 15-60 ms to about
//! 3 ms (docs/storage.md, "Scheduling"). The kernel
//! keeps normal threads running even then: real-time threads get at most
//! `sched_rt_runtime_us` of every `sched_rt_period_us` (95 % by default)
//! and, since Linux 6.12, normal threads have a deadline server of their
//! own; and the alert path is event-driven, so it only takes the CPU while
//! there is work on its way to an alert. Without permission (root,
//! `CAP_SYS_NICE` or `RLIMIT_RTPRIO`, e.g. systemd's `LimitRTPRIO=1`), the
//! threads fall back to a short time slice, and say so once in the log.

use std::sync::Once;

/// How the threads on the alert path are scheduled (`scheduling.alert_path`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AlertPathScheduling {
    /// The real-time class, `SCHED_FIFO` at priority 1; a short time slice
    /// where that is not permitted.
    #[default]
    Realtime,
    /// The normal class with a short time slice (EEVDF, Linux 6.12 and
    /// later): a woken thread preempts one with a longer slice, when the
    /// scheduler finds it eligible.
    ShortSlice,
    /// Left as the process runs.
    Normal,
}

impl AlertPathScheduling {
    pub const ALL: [Self; 3] = [Self::Realtime, Self::ShortSlice, Self::Normal];

    pub fn name(self) -> &'static str {
        match self {
            Self::Realtime => "realtime",
            Self::ShortSlice => "short-slice",
            Self::Normal => "normal",
        }
    }
}

impl std::str::FromStr for AlertPathScheduling {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().map(|m| m.name()).collect();
                format!("{s:?} is not one of {}", names.join(", "))
            })
    }
}

/// How far a background thread's disk requests step back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackgroundIo {
    /// The lowest best-effort level: a smaller share where the I/O
    /// scheduler weighs levels (BFQ), never starved. For work that must
    /// not wait long (log segments; flushes once memory runs short).
    Lowest,
    /// The idle class: disk time only when no other request waits (on
    /// mq-deadline and BFQ; mq-deadline still serves a waiting request
    /// after 10 s). For work that may wait (compaction; flushes while
    /// memory is plentiful).
    Idle,
}

/// Lowers the calling thread's priority: the normal class at nice 10 with
/// the default time slice for the CPU (a thread started from an alert-path
/// thread may inherit its short slice), and `io` for its disk requests, so
/// that its writes and fsyncs queue behind the write-ahead log's. Without
/// permission, or on another kernel, the thread runs as it was.
pub fn lower_current_thread(io: BackgroundIo) {
    // SAFETY: setpriority only reads its arguments; on Linux, PRIO_PROCESS
    // with id 0 applies to the calling thread alone.
    if !set_current_thread_scheduling(10, 0)
        && unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) } != 0
    {
        tracing::debug!("could not lower a background thread's CPU priority");
    }
    set_current_thread_io(io);
}

/// The time slice a thread on the alert path asks for when it cannot run
/// in the real-time class: the shortest the kernel grants (0.1 ms). Under
/// the EEVDF scheduler (Linux 6.12 and later), a thread with a shorter
/// slice than the one running has the earlier virtual deadline and
/// preempts it when it wakes, instead of waiting out the other's slice (by
/// default 0.7 ms times 1 + log2 of the CPUs, 1.4 ms on two, and several
/// of them when several threads are runnable). Its share of the CPU is
/// unchanged: that is the nice value's business, and stays 0.
const ALERT_PATH_SLICE_NS: u64 = 100_000;

/// The alert path's real-time priority: the lowest, below the kernel's
/// interrupt threads (50) and anything an administrator ranks higher.
const ALERT_PATH_RT_PRIORITY: i32 = 1;

/// `SCHED_RESET_ON_FORK` (include/uapi/linux/sched.h): threads the
/// alert path starts begin in the normal class.
const SCHED_RESET_ON_FORK: i32 = 0x4000_0000;

/// Schedules the calling thread as one a publish passes through on its way
/// to an alert, as `wanted` says; returns what the kernel granted. Threads
/// it starts do not inherit the real-time class (`SCHED_RESET_ON_FORK`);
/// they inherit a short slice, which background ones reset in
/// [`lower_current_thread`].
pub fn alert_path_current_thread(wanted: AlertPathScheduling) -> AlertPathScheduling {
    static REFUSED: Once = Once::new();
    if wanted == AlertPathScheduling::Realtime {
        match set_current_thread_realtime() {
            Ok(()) => return AlertPathScheduling::Realtime,
            Err(e) => REFUSED.call_once(|| {
                tracing::warn!(
                    "the alert path cannot run in the real-time class ({e}); it runs \
                     with a short time slice instead, and alerts may wait behind \
                     background work on a busy machine. Grant CAP_SYS_NICE or \
                     RLIMIT_RTPRIO >= 1 (systemd: LimitRTPRIO=1), or set \
                     scheduling.alert_path = \"short-slice\" to silence this"
                )
            }),
        }
    }
    if wanted == AlertPathScheduling::Normal {
        return AlertPathScheduling::Normal;
    }
    // SAFETY: getpriority only reads its arguments (PRIO_PROCESS with id
    // 0: the calling thread). Its nice value is kept.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    if set_current_thread_scheduling(nice, ALERT_PATH_SLICE_NS) {
        AlertPathScheduling::ShortSlice
    } else {
        tracing::debug!("could not shorten an alert-path thread's time slice");
        AlertPathScheduling::Normal
    }
}

/// Moves the calling thread to `SCHED_FIFO` at the alert path's priority,
/// with `SCHED_RESET_ON_FORK`.
fn set_current_thread_realtime() -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param {
            sched_priority: ALERT_PATH_RT_PRIORITY,
        };
        // SAFETY: sched_setscheduler reads `param`, which lives across the
        // call; pid 0 is the calling thread.
        let rc =
            unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO | SCHED_RESET_ON_FORK, &param) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
    }
}

/// Sets the calling thread's nice value and time slice (0: the kernel's
/// default) with `sched_setattr(2)`; false if the kernel refused.
fn set_current_thread_scheduling(nice: i32, slice_ns: u64) -> bool {
    #[cfg(target_os = "linux")]
    {
        // include/uapi/linux/sched/types.h, SCHED_ATTR_SIZE_VER0.
        #[repr(C)]
        struct SchedAttr {
            size: u32,
            sched_policy: u32,
            sched_flags: u64,
            sched_nice: i32,
            sched_priority: u32,
            sched_runtime: u64,
            sched_deadline: u64,
            sched_period: u64,
        }
        let attr = SchedAttr {
            size: std::mem::size_of::<SchedAttr>() as u32,
            sched_policy: libc::SCHED_OTHER as u32,
            sched_flags: 0,
            sched_nice: nice,
            sched_priority: 0,
            sched_runtime: slice_ns,
            sched_deadline: 0,
            sched_period: 0,
        };
        // SAFETY: sched_setattr reads `attr`, which lives across the call
        // and states its own size; pid 0 is the calling thread.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_sched_setattr,
                0 as libc::c_long,
                &attr as *const SchedAttr,
                0 as libc::c_long,
            )
        };
        rc == 0
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (nice, slice_ns);
        false
    }
}

/// Sets the I/O priority of the calling thread's disk requests.
pub fn set_current_thread_io(io: BackgroundIo) {
    #[cfg(target_os = "linux")]
    {
        // include/uapi/linux/ioprio.h
        const IOPRIO_WHO_PROCESS: libc::c_long = 1;
        const IOPRIO_CLASS_BE: libc::c_long = 2;
        const IOPRIO_CLASS_IDLE: libc::c_long = 3;
        const IOPRIO_CLASS_SHIFT: libc::c_long = 13;
        let value = match io {
            BackgroundIo::Lowest => (IOPRIO_CLASS_BE << IOPRIO_CLASS_SHIFT) | 7,
            BackgroundIo::Idle => IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT,
        };
        // SAFETY: ioprio_set takes three integers; who 0 is the calling
        // thread.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_ioprio_set,
                IOPRIO_WHO_PROCESS,
                0 as libc::c_long,
                value,
            )
        };
        if rc != 0 {
            tracing::debug!("could not lower a background thread's I/O priority");
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The calling thread's policy, and whether it resets on fork.
    fn policy() -> (i32, bool) {
        // SAFETY: pid 0 is the calling thread.
        let p = unsafe { libc::sched_getscheduler(0) };
        assert!(
            p >= 0,
            "sched_getscheduler: {}",
            std::io::Error::last_os_error()
        );
        (p & !SCHED_RESET_ON_FORK, p & SCHED_RESET_ON_FORK != 0)
    }

    fn rt_priority() -> i32 {
        let mut param = libc::sched_param { sched_priority: -1 };
        // SAFETY: sched_getparam writes `param`; pid 0 is the calling thread.
        assert_eq!(unsafe { libc::sched_getparam(0, &mut param) }, 0);
        param.sched_priority
    }

    fn nice() -> i32 {
        // SAFETY: as in alert_path_current_thread.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
    }

    /// The calling thread's time slice (`sched_runtime` of sched_getattr).
    fn slice_ns() -> u64 {
        let mut attr = [0u64; 7];
        // SAFETY: sched_getattr writes at most `size` (56) bytes into attr.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_sched_getattr,
                0 as libc::c_long,
                attr.as_mut_ptr(),
                56 as libc::c_long,
                0 as libc::c_long,
            )
        };
        assert_eq!(rc, 0, "sched_getattr: {}", std::io::Error::last_os_error());
        // size u32, policy u32 | flags u64 | nice i32, priority u32 | runtime u64
        attr[3]
    }

    fn on_new_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(f).join().expect("test thread")
    }

    #[test]
    fn the_alert_path_runs_real_time_and_what_it_starts_does_not() {
        on_new_thread(|| {
            let got = alert_path_current_thread(AlertPathScheduling::Realtime);
            if got != AlertPathScheduling::Realtime {
                // Only a refusal of the kernel's may send it elsewhere, and
                // then it still gets the short slice.
                let refused = set_current_thread_realtime().expect_err("realtime was refused");
                assert_eq!(refused.kind(), std::io::ErrorKind::PermissionDenied);
                assert_eq!(got, AlertPathScheduling::ShortSlice);
                assert_eq!(policy(), (libc::SCHED_OTHER, false));
                return;
            }
            assert_eq!(policy(), (libc::SCHED_FIFO, true));
            assert_eq!(rt_priority(), ALERT_PATH_RT_PRIORITY);
            // A thread it starts runs in the normal class at nice 0.
            let child = on_new_thread(|| (policy(), rt_priority(), nice()));
            assert_eq!(child, ((libc::SCHED_OTHER, false), 0, 0));
            // And a background thread leaves the real-time class.
            lower_current_thread(BackgroundIo::Lowest);
            assert_eq!(policy(), (libc::SCHED_OTHER, false));
            assert_eq!(nice(), 10);
        });
    }

    #[test]
    fn a_short_slice_is_inherited_and_reset_by_background_threads() {
        on_new_thread(|| {
            let default_slice = slice_ns();
            let got = alert_path_current_thread(AlertPathScheduling::ShortSlice);
            assert_eq!(policy(), (libc::SCHED_OTHER, false));
            if got == AlertPathScheduling::Normal {
                // A kernel before 6.12 takes no slice.
                assert_eq!(slice_ns(), default_slice);
                return;
            }
            assert_eq!(got, AlertPathScheduling::ShortSlice);
            assert_eq!(slice_ns(), ALERT_PATH_SLICE_NS);
            assert_eq!(on_new_thread(slice_ns), ALERT_PATH_SLICE_NS);
            on_new_thread(move || {
                lower_current_thread(BackgroundIo::Idle);
                assert_eq!(nice(), 10);
                assert_ne!(slice_ns(), ALERT_PATH_SLICE_NS);
            });
        });
    }

    #[test]
    fn normal_leaves_the_thread_as_it_was() {
        on_new_thread(|| {
            let before = (policy(), nice(), slice_ns());
            let got = alert_path_current_thread(AlertPathScheduling::Normal);
            assert_eq!(got, AlertPathScheduling::Normal);
            assert_eq!((policy(), nice(), slice_ns()), before);
        });
    }

    #[test]
    fn modes_parse_from_their_names() {
        for m in AlertPathScheduling::ALL {
            assert_eq!(m.name().parse::<AlertPathScheduling>(), Ok(m));
        }
        let e = "fifo".parse::<AlertPathScheduling>().unwrap_err();
        assert!(e.contains("realtime, short-slice, normal"), "{e}");
    }
}
