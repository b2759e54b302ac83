//! The device registry: which devices may connect, with which secret, and
//! which patient their readings belong to.
//!
//! It lives in `devices.json` in the data directory. Commands change it
//! under an exclusive file lock and replace the file atomically
//! ([`crate::jsonstore`]), so a running server never reads half a file; the
//! server polls it and picks changes up within a second
//! ([`RegistryWatcher`]). A device may be unbound (no patient): its readings
//! are stored, but raise no patient alert.
//!
//! Secrets are never stored: only a PBKDF2-HMAC-SHA256 hash (RFC 8018 §5.2)
//! with a random 16-byte salt per device. Generated secrets are 32 random
//! bytes (256 bits); a secret chosen by the operator must be at least 16
//! characters. A successful check is remembered in memory (as a SHA-256 of
//! the secret) so reconnect storms do not pay the key derivation again.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use ring::rand::{SecureRandom, SystemRandom};
use ring::{digest, pbkdf2};
use serde::{Deserialize, Serialize};
use wardflow_model::{DeviceId, PatientId, now_ns};

use crate::jsonstore::{self, StoreError, Watched};

/// File name of the registry in the data directory.
pub const REGISTRY_FILE: &str = "devices.json";
/// PBKDF2 iterations for new devices. Generated secrets carry 256 bits of
/// entropy, so the iteration count only matters for operator-chosen secrets.
pub const PBKDF2_ITERATIONS: u32 = 20_000;
/// Shortest operator-chosen secret.
pub const MIN_SECRET_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("device {0} is already registered (remove it first to re-register)")]
    Exists(DeviceId),
    #[error("device {0} is not registered")]
    NotFound(String),
    #[error("device {device} is bound to patient {bound}, not {asked}")]
    BoundElsewhere {
        device: String,
        bound: String,
        asked: String,
    },
    #[error("device {0} is not bound to a patient")]
    NotBound(String),
    #[error("the secret is {len} characters; a chosen secret needs at least {MIN_SECRET_LEN}")]
    WeakSecret { len: usize },
}

/// A salted PBKDF2-HMAC-SHA256 hash of a secret (RFC 8018 §5.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretHash {
    /// Hex of the PBKDF2 salt.
    pub salt: String,
    /// Hex of the PBKDF2-HMAC-SHA256 output.
    pub hash: String,
    pub iterations: u32,
}

impl SecretHash {
    /// Hashes a secret with a fresh random salt.
    pub fn new(secret: &str) -> SecretHash {
        let rng = SystemRandom::new();
        let mut salt = [0u8; 16];
        rng.fill(&mut salt).expect("system random source");
        let mut hash = [0u8; digest::SHA256_OUTPUT_LEN];
        let iterations = NonZeroU32::new(PBKDF2_ITERATIONS).expect("nonzero");
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            iterations,
            &salt,
            secret.as_bytes(),
            &mut hash,
        );
        SecretHash {
            salt: hex::encode(salt),
            hash: hex::encode(hash),
            iterations: PBKDF2_ITERATIONS,
        }
    }

    /// Checks `secret` against the hash in constant time.
    pub fn verify(&self, secret: &[u8]) -> bool {
        let (Ok(salt), Ok(hash), Some(iterations)) = (
            hex::decode(&self.salt),
            hex::decode(&self.hash),
            NonZeroU32::new(self.iterations),
        ) else {
            return false;
        };
        pbkdf2::verify(pbkdf2::PBKDF2_HMAC_SHA256, iterations, &salt, secret, &hash).is_ok()
    }
}

/// A new secret: `chosen` if long enough, else 32 random bytes in hex.
pub fn new_secret(chosen: Option<String>) -> Result<String, RegistryError> {
    match chosen {
        Some(s) if s.chars().count() < MIN_SECRET_LEN => Err(RegistryError::WeakSecret {
            len: s.chars().count(),
        }),
        Some(s) => Ok(s),
        None => {
            let mut raw = [0u8; 32];
            SystemRandom::new()
                .fill(&mut raw)
                .expect("system random source");
            Ok(hex::encode(raw))
        }
    }
}

/// Remembers secrets that verified (as SHA-256 fingerprints), so reconnect
/// storms do not pay the key derivation again.
#[derive(Default)]
pub struct VerifiedCache {
    verified: Mutex<HashMap<String, (String, [u8; 32])>>,
}

impl VerifiedCache {
    /// Checks `secret` for account `id`, whose stored hash is `stored`.
    pub fn check(&self, id: &str, stored: &SecretHash, secret: &[u8]) -> bool {
        let fingerprint: [u8; 32] = digest::digest(&digest::SHA256, secret)
            .as_ref()
            .try_into()
            .expect("32 bytes");
        let cached = self
            .verified
            .lock()
            .get(id)
            .is_some_and(|(hash, fp)| *hash == stored.hash && *fp == fingerprint);
        if cached {
            return true;
        }
        if stored.verify(secret) {
            self.verified
                .lock()
                .insert(id.to_string(), (stored.hash.clone(), fingerprint));
            return true;
        }
        false
    }
}

/// A registered device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub id: DeviceId,
    /// The patient its readings belong to; none while unbound.
    #[serde(default)]
    pub patient: Option<PatientId>,
    #[serde(flatten)]
    pub secret: SecretHash,
    /// When the device was added, ns since the epoch.
    pub added_ns: i64,
}

impl DeviceRecord {
    /// Checks `secret` against the stored hash in constant time.
    pub fn verify(&self, secret: &[u8]) -> bool {
        self.secret.verify(secret)
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct RegistryFile {
    version: u32,
    devices: Vec<DeviceRecord>,
}

/// The registry as loaded from disk.
#[derive(Debug, Default, Clone)]
pub struct Registry {
    devices: BTreeMap<DeviceId, DeviceRecord>,
}

impl<'de> Deserialize<'de> for Registry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let file = RegistryFile::deserialize(d)?;
        Ok(Registry {
            devices: file
                .devices
                .into_iter()
                .map(|d| (d.id.clone(), d))
                .collect(),
        })
    }
}

impl Serialize for Registry {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        RegistryFile {
            version: 1,
            devices: self.devices.values().cloned().collect(),
        }
        .serialize(s)
    }
}

impl Registry {
    /// Loads the registry of `data_dir`; a missing file is an empty registry.
    pub fn load(data_dir: &Path) -> Result<Registry, RegistryError> {
        Ok(jsonstore::load(data_dir, REGISTRY_FILE)?)
    }

    pub fn get(&self, id: &str) -> Option<&DeviceRecord> {
        self.devices.get(id)
    }

    pub fn devices(&self) -> impl Iterator<Item = &DeviceRecord> {
        self.devices.values()
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Registers a device. Returns the secret: `secret` if given, otherwise a
    /// newly generated one (shown once; only its hash is kept).
    pub fn add(
        data_dir: &Path,
        id: DeviceId,
        patient: Option<PatientId>,
        secret: Option<&str>,
    ) -> Result<String, RegistryError> {
        Self::add_many(data_dir, [(id, patient, secret.map(str::to_string))])
            .map(|mut v| v.pop().expect("one device"))
    }

    /// Registers several devices under one lock and one write.
    pub fn add_many(
        data_dir: &Path,
        devices: impl IntoIterator<Item = (DeviceId, Option<PatientId>, Option<String>)>,
    ) -> Result<Vec<String>, RegistryError> {
        jsonstore::update(data_dir, REGISTRY_FILE, |reg: &mut Registry| {
            let mut secrets = Vec::new();
            for (id, patient, secret) in devices {
                if reg.devices.contains_key(&id) {
                    return Err(RegistryError::Exists(id));
                }
                let secret = new_secret(secret)?;
                reg.devices.insert(
                    id.clone(),
                    DeviceRecord {
                        id,
                        patient,
                        secret: SecretHash::new(&secret),
                        added_ns: now_ns(),
                    },
                );
                secrets.push(secret);
            }
            Ok(secrets)
        })
    }

    /// Removes a device; its open connections are refused at their next publish.
    pub fn remove(data_dir: &Path, id: &str) -> Result<DeviceRecord, RegistryError> {
        jsonstore::update(data_dir, REGISTRY_FILE, |reg: &mut Registry| {
            reg.devices
                .remove(id)
                .ok_or_else(|| RegistryError::NotFound(id.to_string()))
        })
    }

    /// Binds a device to a patient (replacing any binding); returns the
    /// previous patient. Its next publish belongs to the new patient.
    pub fn bind(
        data_dir: &Path,
        id: &str,
        patient: PatientId,
    ) -> Result<Option<PatientId>, RegistryError> {
        jsonstore::update(data_dir, REGISTRY_FILE, |reg: &mut Registry| {
            let d = reg
                .devices
                .get_mut(id)
                .ok_or_else(|| RegistryError::NotFound(id.to_string()))?;
            Ok(d.patient.replace(patient))
        })
    }

    /// Unbinds a device from `patient` (refused if bound to someone else).
    pub fn unbind(data_dir: &Path, id: &str, patient: &str) -> Result<(), RegistryError> {
        jsonstore::update(data_dir, REGISTRY_FILE, |reg: &mut Registry| {
            let d = reg
                .devices
                .get_mut(id)
                .ok_or_else(|| RegistryError::NotFound(id.to_string()))?;
            match &d.patient {
                None => Err(RegistryError::NotBound(id.to_string())),
                Some(p) if p.as_str() != patient => Err(RegistryError::BoundElsewhere {
                    device: id.to_string(),
                    bound: p.to_string(),
                    asked: patient.to_string(),
                }),
                Some(_) => {
                    d.patient = None;
                    Ok(())
                }
            }
        })
    }
}

/// The outcome of a device's CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthOutcome {
    Accepted {
        patient: Option<PatientId>,
    },
    /// Not registered (MQTT v5 0x86 would leak existence; the server answers
    /// both cases alike unless configured otherwise).
    UnknownDevice,
    BadSecret,
}

/// A registry snapshot shared by the server's threads and reloaded when the
/// file changes.
pub struct RegistryWatcher {
    file: Arc<Watched<Registry>>,
    verified: VerifiedCache,
}

impl RegistryWatcher {
    pub fn open(data_dir: &Path) -> Result<Arc<RegistryWatcher>, RegistryError> {
        Ok(Arc::new(RegistryWatcher {
            file: Watched::open(data_dir, REGISTRY_FILE)?,
            verified: VerifiedCache::default(),
        }))
    }

    /// The registry as of the last reload.
    pub fn snapshot(&self) -> Arc<Registry> {
        self.file.snapshot()
    }

    /// Counts reloads: a cheap way to notice a change.
    pub fn version(&self) -> u64 {
        self.file.version()
    }

    /// Reloads if the file changed. Returns whether it reloaded.
    pub fn reload_if_changed(&self) -> Result<bool, RegistryError> {
        Ok(self.file.reload_if_changed()?)
    }

    /// Polls the file every `period` on a background thread.
    pub fn spawn_poller(self: &Arc<Self>, period: Duration) {
        self.file.spawn_poller(period);
    }

    /// Checks a device's credentials.
    pub fn authenticate(&self, id: &str, secret: &[u8]) -> AuthOutcome {
        let reg = self.snapshot();
        let Some(record) = reg.get(id) else {
            return AuthOutcome::UnknownDevice;
        };
        if self.verified.check(id, &record.secret, secret) {
            AuthOutcome::Accepted {
                patient: record.patient.clone(),
            }
        } else {
            AuthOutcome::BadSecret
        }
    }

    /// The binding of a device now: None if it is no longer registered,
    /// `Some(None)` if it is registered but unbound.
    pub fn binding(&self, id: &str) -> Option<Option<PatientId>> {
        self.file.snapshot().get(id).map(|r| r.patient.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn ids(d: &str, p: &str) -> (DeviceId, PatientId) {
        (DeviceId::new(d).unwrap(), PatientId::new(p).unwrap())
    }

    #[test]
    fn add_verify_remove() {
        let dir = tempfile::tempdir().unwrap();
        let (d, p) = ids("mon-1", "p-1");
        let secret = Registry::add(dir.path(), d.clone(), Some(p.clone()), None).unwrap();
        assert_eq!(secret.len(), 64);
        let text = fs::read_to_string(dir.path().join(REGISTRY_FILE)).unwrap();
        assert!(!text.contains(&secret), "the secret itself is never stored");

        let w = RegistryWatcher::open(dir.path()).unwrap();
        assert_eq!(
            w.authenticate("mon-1", secret.as_bytes()),
            AuthOutcome::Accepted {
                patient: Some(p.clone())
            }
        );
        assert_eq!(
            w.authenticate("mon-1", secret.as_bytes()),
            AuthOutcome::Accepted { patient: Some(p) }
        );
        assert_eq!(w.authenticate("mon-1", b"wrong"), AuthOutcome::BadSecret);
        assert_eq!(
            w.authenticate("mon-2", secret.as_bytes()),
            AuthOutcome::UnknownDevice
        );

        assert!(matches!(
            Registry::add(dir.path(), d, Some(ids("x", "y").1), None),
            Err(RegistryError::Exists(_))
        ));
        Registry::remove(dir.path(), "mon-1").unwrap();
        assert!(matches!(
            Registry::remove(dir.path(), "mon-1"),
            Err(RegistryError::NotFound(_))
        ));
        w.reload_if_changed().unwrap();
        assert_eq!(
            w.authenticate("mon-1", secret.as_bytes()),
            AuthOutcome::UnknownDevice
        );
    }

    #[test]
    fn chosen_secrets_must_be_long_enough() {
        let dir = tempfile::tempdir().unwrap();
        let (d, p) = ids("mon-1", "p-1");
        let err = Registry::add(dir.path(), d.clone(), Some(p.clone()), Some("short")).unwrap_err();
        assert!(matches!(err, RegistryError::WeakSecret { len: 5 }));
        let s = Registry::add(dir.path(), d, Some(p), Some("a-long-enough-secret")).unwrap();
        assert_eq!(s, "a-long-enough-secret");
    }

    #[test]
    fn a_re_registered_device_needs_its_new_secret() {
        let dir = tempfile::tempdir().unwrap();
        let (d, p) = ids("mon-1", "p-1");
        let old = Registry::add(dir.path(), d.clone(), Some(p.clone()), None).unwrap();
        let w = RegistryWatcher::open(dir.path()).unwrap();
        assert!(matches!(
            w.authenticate("mon-1", old.as_bytes()),
            AuthOutcome::Accepted { .. }
        ));
        Registry::remove(dir.path(), "mon-1").unwrap();
        let new = Registry::add(dir.path(), d, Some(p), None).unwrap();
        w.reload_if_changed().unwrap();
        assert_eq!(
            w.authenticate("mon-1", old.as_bytes()),
            AuthOutcome::BadSecret
        );
        assert!(matches!(
            w.authenticate("mon-1", new.as_bytes()),
            AuthOutcome::Accepted { .. }
        ));
    }

    #[test]
    fn a_corrupt_file_names_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join(REGISTRY_FILE),
            "{\n  \"version\": 1,\n  \"devices\": [ oops ]\n}",
        )
        .unwrap();
        let err = Registry::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("devices.json:3:"), "{err}");
    }

    #[test]
    fn bind_and_unbind() {
        let dir = tempfile::tempdir().unwrap();
        let (d, p) = ids("mon-1", "p-1");
        Registry::add(dir.path(), d, None, None).unwrap();
        let w = RegistryWatcher::open(dir.path()).unwrap();
        assert_eq!(w.binding("mon-1"), Some(None));
        assert_eq!(w.binding("mon-2"), None);
        assert_eq!(
            Registry::bind(dir.path(), "mon-1", p.clone()).unwrap(),
            None
        );
        w.reload_if_changed().unwrap();
        assert_eq!(w.binding("mon-1"), Some(Some(p)));
        assert!(matches!(
            Registry::unbind(dir.path(), "mon-1", "p-2"),
            Err(RegistryError::BoundElsewhere { .. })
        ));
        Registry::unbind(dir.path(), "mon-1", "p-1").unwrap();
        assert!(matches!(
            Registry::unbind(dir.path(), "mon-1", "p-1"),
            Err(RegistryError::NotBound(_))
        ));
    }
}
