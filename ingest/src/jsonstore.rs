//! Small JSON files in the data directory that commands change while the
//! server runs (devices, patients, clinicians): read whole, changed under an
//! exclusive lock file, replaced atomically (write, fsync, rename, fsync
//! the directory), and watched by the server, which reloads a file when its
//! inode, modification time or length changes.

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Why a file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
}

pub fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads `name` in `dir`; a missing file is the default value.
pub fn load<F: DeserializeOwned + Default>(dir: &Path, name: &str) -> Result<F, StoreError> {
    let path = dir.join(name);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(F::default()),
        Err(e) => return Err(io_err(&path)(e)),
    };
    serde_json::from_str(&text).map_err(|e| StoreError::Parse {
        path: path.clone(),
        line: e.line(),
        column: e.column(),
        message: e.to_string(),
    })
}

/// Runs `change` on the file's contents under its lock, then writes them
/// back atomically if `change` succeeded.
pub fn update<F, T, E>(
    dir: &Path,
    name: &str,
    change: impl FnOnce(&mut F) -> Result<T, E>,
) -> Result<T, E>
where
    F: DeserializeOwned + Serialize + Default,
    E: From<StoreError>,
{
    let lock = lock(dir, name)?;
    let mut contents: F = load(dir, name)?;
    let out = change(&mut contents)?;
    write_locked(dir, name, &contents)?;
    drop(lock);
    Ok(out)
}

/// Replaces the file's contents with `value`, under its lock, atomically,
/// without reading what was there (for a file only this process writes).
pub fn replace<F: Serialize>(dir: &Path, name: &str, value: &F) -> Result<(), StoreError> {
    let lock = lock(dir, name)?;
    write_locked(dir, name, value)?;
    drop(lock);
    Ok(())
}

/// Takes the file's exclusive lock (a lock file beside it).
fn lock(dir: &Path, name: &str) -> Result<File, StoreError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let lock_path = dir.join(format!("{}.lock", name.trim_end_matches(".json")));
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_err(&lock_path))?;
    lock.lock().map_err(io_err(&lock_path))?;
    Ok(lock)
}

/// Writes a temporary file, fsyncs it, renames it over the file, and
/// fsyncs the directory. The caller holds the lock.
fn write_locked<F: Serialize>(dir: &Path, name: &str, contents: &F) -> Result<(), StoreError> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    serde_json::to_writer_pretty(&mut f, contents).map_err(|e| io_err(&tmp)(e.into()))?;
    f.write_all(b"\n").map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

type Stamp = Option<(u64, SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    fs::metadata(path).ok().map(|m| {
        (
            m.ino(),
            m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            m.len(),
        )
    })
}

/// The latest good contents of a watched file.
pub struct Watched<F> {
    dir: PathBuf,
    name: &'static str,
    current: ArcSwap<F>,
    stamp: Mutex<Stamp>,
    version: std::sync::atomic::AtomicU64,
}

impl<F: DeserializeOwned + Default + Send + Sync + 'static> Watched<F> {
    pub fn open(dir: &Path, name: &'static str) -> Result<Arc<Watched<F>>, StoreError> {
        let w = Arc::new(Watched {
            dir: dir.to_path_buf(),
            name,
            current: ArcSwap::from_pointee(F::default()),
            stamp: Mutex::new(None),
            version: Default::default(),
        });
        w.reload_if_changed()?;
        Ok(w)
    }

    /// The contents as of the last reload.
    pub fn snapshot(&self) -> Arc<F> {
        self.current.load_full()
    }

    /// Counts reloads: a cheap way to notice a change.
    pub fn version(&self) -> u64 {
        self.version.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Reloads if the file changed; returns whether it did.
    pub fn reload_if_changed(&self) -> Result<bool, StoreError> {
        let now = stamp(&self.dir.join(self.name));
        let mut last = self.stamp.lock();
        // A file still missing is unchanged too, once it has been read
        // (as empty) the first time.
        let read_once = self.version.load(std::sync::atomic::Ordering::Acquire) > 0;
        if *last == now && (now.is_some() || read_once) {
            return Ok(false);
        }
        let contents: F = load(&self.dir, self.name)?;
        self.current.store(Arc::new(contents));
        *last = now;
        self.version
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Ok(true)
    }

    /// Polls the file every `period` on a background thread for as long as
    /// the watcher lives.
    pub fn spawn_poller(self: &Arc<Self>, period: Duration) {
        let weak = Arc::downgrade(self);
        let name = self.name;
        std::thread::Builder::new()
            .name(format!("watch-{}", name.trim_end_matches(".json")))
            .spawn(move || {
                while let Some(w) = weak.upgrade() {
                    match w.reload_if_changed() {
                        Ok(true) => tracing::info!(file = name, "reloaded"),
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!("{name} not reloaded, keeping the previous one: {e}")
                        }
                    }
                    drop(w);
                    std::thread::sleep(period);
                }
            })
            .expect("spawn file watcher");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A file that does not exist is read once, as empty, and then left
    /// alone until it appears.
    #[test]
    fn a_missing_file_is_not_reloaded_again_and_again() {
        let dir = tempfile::tempdir().unwrap();
        let w = Watched::<BTreeMap<String, u32>>::open(dir.path(), "x.json").unwrap();
        let v = w.version();
        assert!(!w.reload_if_changed().unwrap());
        assert!(!w.reload_if_changed().unwrap());
        assert_eq!(w.version(), v);
        update(dir.path(), "x.json", |m: &mut BTreeMap<String, u32>| {
            m.insert("a".into(), 1);
            Ok::<_, StoreError>(())
        })
        .unwrap();
        assert!(w.reload_if_changed().unwrap());
        assert_eq!(w.snapshot()["a"], 1);
        std::fs::remove_file(dir.path().join("x.json")).unwrap();
        assert!(
            w.reload_if_changed().unwrap(),
            "a deleted file is read as empty"
        );
        assert!(w.snapshot().is_empty());
        assert!(!w.reload_if_changed().unwrap());
    }

    #[test]
    fn update_then_watch() {
        let dir = tempfile::tempdir().unwrap();
        let w = Watched::<BTreeMap<String, u32>>::open(dir.path(), "x.json").unwrap();
        assert!(w.snapshot().is_empty());
        update(dir.path(), "x.json", |m: &mut BTreeMap<String, u32>| {
            m.insert("a".into(), 1);
            Ok::<_, StoreError>(())
        })
        .unwrap();
        assert!(w.reload_if_changed().unwrap());
        assert_eq!(w.snapshot().get("a"), Some(&1));
        assert!(!w.reload_if_changed().unwrap());
        // A failed change writes nothing.
        let r = update(dir.path(), "x.json", |m: &mut BTreeMap<String, u32>| {
            m.clear();
            Err::<(), _>(StoreError::Io {
                path: "x".into(),
                source: std::io::Error::other("no"),
            })
        });
        assert!(r.is_err());
        assert_eq!(
            load::<BTreeMap<String, u32>>(dir.path(), "x.json")
                .unwrap()
                .len(),
            1
        );
    }
}
