//! Background threads: work that can wait (Parquet encoding, compaction,
//! preparing log segments, the audit ledger's hashing) yields the CPU and
//! the disk to work that cannot (reading publishes, writing them to the
//! log, alerts), and the threads on a publish's way to its alert ask for a
//! short time slice so that they run soon after they wake.

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

/// Lowers the calling thread's priority: nice 10 and the default time
/// slice for the CPU (a thread started from an alert-path thread inherits
/// its short slice), and `io` for its disk requests, so that its writes
/// and fsyncs queue behind the write-ahead log's. Without permission, or
/// on another kernel, the thread runs as it was.
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

/// The time slice a thread on the alert path asks for: the shortest the
/// kernel grants (0.1 ms). Under the EEVDF scheduler (Linux 6.12 and
/// later), a thread with a shorter slice than the one running has the
/// earlier virtual deadline and preempts it when it wakes, instead of
/// waiting out the other's slice (by default 0.7 ms times 1 + log2 of the
/// CPUs, 1.4 ms on two, and several of them when several threads are
/// runnable). Its share of the CPU is unchanged: that is the nice value's
/// business, and stays 0.
const ALERT_PATH_SLICE_NS: u64 = 100_000;

/// Marks the calling thread as one a publish passes through on its way to
/// an alert (the MQTT workers, the write-ahead log's writer, the dataflow
/// workers, the alert thread): it asks for a short time slice
/// (`sched_setattr(2)`, `sched_runtime` of a `SCHED_OTHER` thread, Linux
/// 6.12 and later). Threads it starts inherit the slice; background ones
/// reset it in [`lower_current_thread`]. On older kernels the thread runs
/// as it was.
pub fn alert_path_current_thread() {
    // SAFETY: getpriority only reads its arguments (PRIO_PROCESS with id
    // 0: the calling thread). Its nice value is kept.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    if !set_current_thread_scheduling(nice, ALERT_PATH_SLICE_NS) {
        tracing::debug!("could not shorten an alert-path thread's time slice");
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
