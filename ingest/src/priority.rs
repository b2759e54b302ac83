//! Background threads: work that can wait (Parquet encoding, compaction,
//! preparing log segments) yields the CPU and the disk to work that cannot
//! (reading publishes, the write-ahead log's commits, alerts).

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

/// Lowers the calling thread's priority: nice 10 for the CPU, and `io` for
/// its disk requests, so that its writes and fsyncs queue behind the
/// write-ahead log's. Without permission, or on another kernel, the thread
/// runs as it was.
pub fn lower_current_thread(io: BackgroundIo) {
    // SAFETY: setpriority only reads its arguments; on Linux, PRIO_PROCESS
    // with id 0 applies to the calling thread alone.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
    if rc != 0 {
        tracing::debug!("could not lower a background thread's CPU priority");
    }
    set_current_thread_io(io);
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
