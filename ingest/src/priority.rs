//! Background threads: work that can wait (Parquet encoding, compaction,
//! preparing log segments) yields the CPU and the disk to work that cannot
//! (reading publishes, the write-ahead log's commits, alerts).

/// Lowers the calling thread's priority: nice 10 for the CPU, and the idle
/// I/O class, so that its writes and fsyncs queue behind the write-ahead
/// log's on schedulers that honour I/O classes (mq-deadline, BFQ; requests
/// of the idle class still age into service). Without permission, or on
/// another kernel, the thread runs as it was.
pub fn lower_current_thread() {
    // SAFETY: setpriority only reads its arguments; on Linux, PRIO_PROCESS
    // with id 0 applies to the calling thread alone.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
    if rc != 0 {
        tracing::debug!("could not lower a background thread's CPU priority");
    }
    #[cfg(target_os = "linux")]
    {
        const IOPRIO_WHO_PROCESS: libc::c_long = 1;
        const IOPRIO_CLASS_IDLE: libc::c_long = 3;
        const IOPRIO_CLASS_SHIFT: libc::c_long = 13;
        // SAFETY: ioprio_set takes three integers; who 0 is the calling
        // thread.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_ioprio_set,
                IOPRIO_WHO_PROCESS,
                0 as libc::c_long,
                IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT,
            )
        };
        if rc != 0 {
            tracing::debug!("could not lower a background thread's I/O priority");
        }
    }
}
