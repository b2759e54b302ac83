//! Who is where, and who looks after them: patient admissions (unit, bed,
//! the few demographics rules and studies need) in `patients.json`, and
//! clinician accounts with the units they cover in `clinicians.json`. Both
//! change while the server runs and are watched like the device registry.
//!
//! A clinician's secret is kept only as a salted PBKDF2 hash; it serves as
//! the MQTT password (username = clinician id) and, as `id:secret`, as the
//! HTTP bearer token.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use wardflow_model::{PatientId, now_ns};

use crate::jsonstore::{self, StoreError, Watched};
use crate::registry::{Registry, RegistryError, SecretHash, VerifiedCache, new_secret};

pub const PATIENTS_FILE: &str = "patients.json";
pub const CLINICIANS_FILE: &str = "clinicians.json";
pub const ADMINS_FILE: &str = "admins.json";
/// The unit of alerts whose patient is not admitted (or whose device is
/// unbound): an operator account covering it sees them.
pub const UNASSIGNED_UNIT: &str = "unassigned";

#[derive(Debug, thiserror::Error)]
pub enum CensusError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("patient {0} is already admitted (use transfer to move them)")]
    AlreadyAdmitted(String),
    #[error("patient {0} is not admitted")]
    NotAdmitted(String),
    #[error("bed {bed} of unit {unit} is taken by patient {patient}")]
    BedTaken {
        unit: String,
        bed: String,
        patient: String,
    },
    #[error("clinician {0} already exists")]
    ClinicianExists(String),
    #[error("clinician {0} does not exist")]
    NoClinician(String),
    #[error("administrator {0} already exists")]
    AdminExists(String),
    #[error("administrator {0} does not exist")]
    NoAdmin(String),
    #[error("{0:?} is already a device id; clinician and device ids must differ")]
    IdIsDevice(String),
    #[error("{what} {value:?}: {reason}")]
    Invalid {
        what: &'static str,
        value: String,
        reason: String,
    },
}

/// Checks a unit or bed name: the id alphabet (they appear in MQTT topics).
pub fn check_name(what: &'static str, value: &str) -> Result<(), CensusError> {
    PatientId::new(value)
        .map(|_| ())
        .map_err(|e| CensusError::Invalid {
            what,
            value: value.to_string(),
            reason: e.to_string().replace("patient id", "name"),
        })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Sex {
    F,
    M,
    X,
}

/// A patient's admission.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Admission {
    pub patient: PatientId,
    pub unit: String,
    pub bed: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub age_years: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sex: Option<Sex>,
    pub admitted_ns: i64,
    /// Last admission or transfer.
    pub since_ns: i64,
}

/// The patients currently admitted.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Census {
    #[serde(default)]
    pub patients: BTreeMap<PatientId, Admission>,
}

impl Census {
    pub fn load(dir: &Path) -> Result<Census, CensusError> {
        Ok(jsonstore::load(dir, PATIENTS_FILE)?)
    }

    pub fn get(&self, patient: &str) -> Option<&Admission> {
        self.patients.get(patient)
    }

    /// The unit a patient's alerts go to.
    pub fn unit_of(&self, patient: &str) -> &str {
        self.get(patient)
            .map_or(UNASSIGNED_UNIT, |a| a.unit.as_str())
    }

    fn check_bed(&self, me: &str, unit: &str, bed: &str) -> Result<(), CensusError> {
        match self
            .patients
            .values()
            .find(|a| a.unit == unit && a.bed == bed && a.patient.as_str() != me)
        {
            Some(a) => Err(CensusError::BedTaken {
                unit: unit.into(),
                bed: bed.into(),
                patient: a.patient.to_string(),
            }),
            None => Ok(()),
        }
    }

    pub fn admit(
        dir: &Path,
        patient: PatientId,
        unit: &str,
        bed: &str,
        age_years: Option<u16>,
        sex: Option<Sex>,
    ) -> Result<Admission, CensusError> {
        check_name("unit", unit)?;
        check_name("bed", bed)?;
        jsonstore::update(dir, PATIENTS_FILE, |c: &mut Census| {
            if c.patients.contains_key(&patient) {
                return Err(CensusError::AlreadyAdmitted(patient.to_string()));
            }
            c.check_bed(patient.as_str(), unit, bed)?;
            let now = now_ns();
            let a = Admission {
                patient: patient.clone(),
                unit: unit.into(),
                bed: bed.into(),
                age_years,
                sex,
                admitted_ns: now,
                since_ns: now,
            };
            c.patients.insert(patient, a.clone());
            Ok(a)
        })
    }

    /// Moves an admitted patient to another unit and bed.
    pub fn transfer(
        dir: &Path,
        patient: &str,
        unit: &str,
        bed: &str,
    ) -> Result<Admission, CensusError> {
        check_name("unit", unit)?;
        check_name("bed", bed)?;
        jsonstore::update(dir, PATIENTS_FILE, |c: &mut Census| {
            c.check_bed(patient, unit, bed)?;
            let a = c
                .patients
                .get_mut(patient)
                .ok_or_else(|| CensusError::NotAdmitted(patient.to_string()))?;
            a.unit = unit.into();
            a.bed = bed.into();
            a.since_ns = now_ns();
            Ok(a.clone())
        })
    }

    /// Discharges a patient: their open alerts resolve.
    pub fn discharge(dir: &Path, patient: &str) -> Result<Admission, CensusError> {
        jsonstore::update(dir, PATIENTS_FILE, |c: &mut Census| {
            c.patients
                .remove(patient)
                .ok_or_else(|| CensusError::NotAdmitted(patient.to_string()))
        })
    }
}

/// A clinician account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Clinician {
    pub id: String,
    pub units: Vec<String>,
    #[serde(flatten)]
    pub secret: SecretHash,
    pub added_ns: i64,
}

impl Clinician {
    pub fn covers(&self, unit: &str) -> bool {
        self.units.iter().any(|u| u == unit)
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Clinicians {
    #[serde(default)]
    pub clinicians: BTreeMap<String, Clinician>,
}

impl Clinicians {
    pub fn load(dir: &Path) -> Result<Clinicians, CensusError> {
        Ok(jsonstore::load(dir, CLINICIANS_FILE)?)
    }

    /// Adds an account; returns its secret (generated unless given).
    pub fn add(
        dir: &Path,
        id: &str,
        units: &[String],
        secret: Option<String>,
    ) -> Result<String, CensusError> {
        check_name("clinician id", id)?;
        if units.is_empty() {
            return Err(CensusError::Invalid {
                what: "units",
                value: String::new(),
                reason: "a clinician covers at least one unit".into(),
            });
        }
        for u in units {
            check_name("unit", u)?;
        }
        if Registry::load(dir)?.get(id).is_some() {
            return Err(CensusError::IdIsDevice(id.into()));
        }
        let secret = new_secret(secret)?;
        jsonstore::update(dir, CLINICIANS_FILE, |c: &mut Clinicians| {
            if c.clinicians.contains_key(id) {
                return Err(CensusError::ClinicianExists(id.into()));
            }
            c.clinicians.insert(
                id.into(),
                Clinician {
                    id: id.into(),
                    units: units.to_vec(),
                    secret: SecretHash::new(&secret),
                    added_ns: now_ns(),
                },
            );
            Ok(())
        })?;
        Ok(secret)
    }

    pub fn remove(dir: &Path, id: &str) -> Result<Clinician, CensusError> {
        jsonstore::update(dir, CLINICIANS_FILE, |c: &mut Clinicians| {
            c.clinicians
                .remove(id)
                .ok_or_else(|| CensusError::NoClinician(id.into()))
        })
    }
}

/// An administrator account of the console (hospital IT): sees every
/// unit and device. Kept in `admins.json`, the secret only as a hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Admin {
    pub id: String,
    #[serde(flatten)]
    pub secret: SecretHash,
    pub added_ns: i64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Admins {
    #[serde(default)]
    pub admins: BTreeMap<String, Admin>,
}

impl Admins {
    pub fn load(dir: &Path) -> Result<Admins, CensusError> {
        Ok(jsonstore::load(dir, ADMINS_FILE)?)
    }

    /// Adds an account; returns its secret (generated unless given).
    pub fn add(dir: &Path, id: &str, secret: Option<String>) -> Result<String, CensusError> {
        check_name("administrator id", id)?;
        let secret = new_secret(secret)?;
        jsonstore::update(dir, ADMINS_FILE, |a: &mut Admins| {
            if a.admins.contains_key(id) {
                return Err(CensusError::AdminExists(id.into()));
            }
            a.admins.insert(
                id.into(),
                Admin {
                    id: id.into(),
                    secret: SecretHash::new(&secret),
                    added_ns: now_ns(),
                },
            );
            Ok(())
        })?;
        Ok(secret)
    }

    pub fn remove(dir: &Path, id: &str) -> Result<Admin, CensusError> {
        jsonstore::update(dir, ADMINS_FILE, |a: &mut Admins| {
            a.admins
                .remove(id)
                .ok_or_else(|| CensusError::NoAdmin(id.into()))
        })
    }
}

/// The census and clinician accounts as the server sees them.
pub struct CensusWatcher {
    dir: std::path::PathBuf,
    pub patients: Arc<Watched<Census>>,
    pub clinicians: Arc<Watched<Clinicians>>,
    pub admins: Arc<Watched<Admins>>,
    verified: VerifiedCache,
}

impl CensusWatcher {
    pub fn open(dir: &Path) -> Result<Arc<CensusWatcher>, CensusError> {
        Ok(Arc::new(CensusWatcher {
            dir: dir.to_path_buf(),
            patients: Watched::open(dir, PATIENTS_FILE)?,
            clinicians: Watched::open(dir, CLINICIANS_FILE)?,
            admins: Watched::open(dir, ADMINS_FILE)?,
            verified: VerifiedCache::default(),
        }))
    }

    /// The data directory the files live in.
    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    pub fn spawn_pollers(&self, period: Duration) {
        self.patients.spawn_poller(period);
        self.clinicians.spawn_poller(period);
        self.admins.spawn_poller(period);
    }

    /// The administrator with this id and secret.
    pub fn authenticate_admin(&self, id: &str, secret: &[u8]) -> Option<Admin> {
        let all = self.admins.snapshot();
        let a = all.admins.get(id)?;
        self.verified
            .check(&format!("admin:{id}"), &a.secret, secret)
            .then(|| a.clone())
    }

    /// The clinician with this id and secret.
    pub fn authenticate(&self, id: &str, secret: &[u8]) -> Option<Clinician> {
        let all = self.clinicians.snapshot();
        let c = all.clinicians.get(id)?;
        self.verified
            .check(&format!("clinician:{id}"), &c.secret, secret)
            .then(|| c.clone())
    }

    /// A clinician from an HTTP bearer token `id:secret`.
    pub fn from_bearer(&self, token: &str) -> Option<Clinician> {
        let (id, secret) = token.split_once(':')?;
        self.authenticate(id, secret.as_bytes())
    }

    /// Whether the clinician account exists (now).
    pub fn is_clinician(&self, id: &str) -> bool {
        self.clinicians.snapshot().clinicians.contains_key(id)
    }

    /// The current units of a clinician (accounts change while connected).
    pub fn units_of(&self, id: &str) -> Vec<String> {
        self.clinicians
            .snapshot()
            .clinicians
            .get(id)
            .map(|c| c.units.clone())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admit_transfer_discharge() {
        let dir = tempfile::tempdir().unwrap();
        let p = PatientId::new("p-1").unwrap();
        Census::admit(
            dir.path(),
            p.clone(),
            "icu-a",
            "bed-1",
            Some(64),
            Some(Sex::F),
        )
        .unwrap();
        assert!(matches!(
            Census::admit(dir.path(), p.clone(), "icu-a", "bed-2", None, None),
            Err(CensusError::AlreadyAdmitted(_))
        ));
        let q = PatientId::new("p-2").unwrap();
        assert!(matches!(
            Census::admit(dir.path(), q, "icu-a", "bed-1", None, None),
            Err(CensusError::BedTaken { .. })
        ));
        Census::transfer(dir.path(), "p-1", "icu-b", "bed-4").unwrap();
        let c = Census::load(dir.path()).unwrap();
        assert_eq!(c.unit_of("p-1"), "icu-b");
        assert_eq!(c.get("p-1").unwrap().age_years, Some(64));
        Census::discharge(dir.path(), "p-1").unwrap();
        assert_eq!(
            Census::load(dir.path()).unwrap().unit_of("p-1"),
            UNASSIGNED_UNIT
        );
        assert!(Census::admit(dir.path(), p, "icu/a", "bed-1", None, None).is_err());
    }

    #[test]
    fn clinicians_authenticate_by_secret_and_bearer() {
        let dir = tempfile::tempdir().unwrap();
        let secret = Clinicians::add(dir.path(), "rn-1", &["icu-a".into()], None).unwrap();
        let w = CensusWatcher::open(dir.path()).unwrap();
        assert!(w.authenticate("rn-1", secret.as_bytes()).is_some());
        assert!(w.authenticate("rn-1", b"wrong").is_none());
        assert!(
            w.from_bearer(&format!("rn-1:{secret}"))
                .unwrap()
                .covers("icu-a")
        );
        assert!(w.from_bearer("rn-1").is_none());
        assert!(matches!(
            Clinicians::add(dir.path(), "rn-1", &["icu-a".into()], None),
            Err(CensusError::ClinicianExists(_))
        ));
        assert!(Clinicians::add(dir.path(), "rn-2", &[], None).is_err());
    }

    #[test]
    fn admins_authenticate_apart_from_clinicians() {
        let dir = tempfile::tempdir().unwrap();
        let secret = Admins::add(dir.path(), "it-1", None).unwrap();
        let w = CensusWatcher::open(dir.path()).unwrap();
        assert!(w.authenticate_admin("it-1", secret.as_bytes()).is_some());
        assert!(w.authenticate_admin("it-1", b"wrong-secret-000").is_none());
        // An administrator is not a clinician, and the other way round.
        assert!(w.authenticate("it-1", secret.as_bytes()).is_none());
        assert!(matches!(
            Admins::add(dir.path(), "it-1", None),
            Err(CensusError::AdminExists(_))
        ));
        Admins::remove(dir.path(), "it-1").unwrap();
        assert!(matches!(
            Admins::remove(dir.path(), "it-1"),
            Err(CensusError::NoAdmin(_))
        ));
    }
}
