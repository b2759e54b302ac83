//! Console sessions: who signed in, as what, until when; and the one-time
//! challenges a patient's key signs to sign in.
//!
//! A session is a random 256-bit token held in an HTTP-only cookie; the
//! server keeps the rest. Sessions live in memory: a restart signs
//! everyone out, which for a central station is the safe side.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use ring::rand::{SecureRandom, SystemRandom};
use wardflow_ledger_bridge::hex;

/// The cookie that carries the session token.
pub const COOKIE: &str = "wardflow_session";
/// How long a session lasts: a shift and a half.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// How long a patient has to sign a challenge.
const CHALLENGE_TTL: Duration = Duration::from_secs(120);
/// Challenges outstanding at most (a flood of requests cannot grow memory).
const MAX_CHALLENGES: usize = 10_000;
/// Sessions at most.
const MAX_SESSIONS: usize = 100_000;
/// What a patient's key signs to sign in: this, the patient, a nonce.
pub const CHALLENGE_PREFIX: &str = "wardflow-console-login";
/// Failed sign-ins of one account before it must wait.
const MAX_FAILURES: u32 = 5;
/// How long an account waits after too many failures, and how long a
/// failure counts.
const LOCKOUT: Duration = Duration::from_secs(60);
/// Accounts with failures remembered at most.
const MAX_FAILING: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Clinician,
    Admin,
    Patient,
}

/// One signed-in user.
#[derive(Debug)]
pub struct Session {
    pub role: Role,
    /// The clinician's or administrator's id, or the patient's.
    pub id: String,
    expires: Instant,
}

impl Session {
    /// The patient a patient's session is for.
    pub fn patient(&self) -> Option<&str> {
        (self.role == Role::Patient).then_some(self.id.as_str())
    }

    /// Who, as the audit trail names them.
    pub fn actor(&self) -> String {
        match self.role {
            Role::Clinician => format!("clinician:{}", self.id),
            Role::Admin => format!("admin:{}", self.id),
            Role::Patient => format!("patient:{}", self.id),
        }
    }
}

#[derive(Default)]
pub struct Sessions {
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    challenges: Mutex<HashMap<String, (String, Instant)>>,
    /// Failed sign-ins per account: how many, and the last one's time.
    failures: Mutex<HashMap<String, (u32, Instant)>>,
}

fn random_hex<const N: usize>() -> String {
    let mut b = [0u8; N];
    SystemRandom::new()
        .fill(&mut b)
        .expect("the system's random source works");
    hex(&b)
}

impl Sessions {
    /// A new session; returns its token.
    pub fn open(&self, role: Role, id: &str) -> (String, Arc<Session>) {
        let token = random_hex::<32>();
        let s = Arc::new(Session {
            role,
            id: id.to_string(),
            expires: Instant::now() + SESSION_TTL,
        });
        let mut all = self.sessions.lock();
        if all.len() >= MAX_SESSIONS {
            let now = Instant::now();
            all.retain(|_, s| s.expires > now);
        }
        all.insert(token.clone(), s.clone());
        (token, s)
    }

    /// The session of a token, if it has not expired.
    pub fn get(&self, token: &str) -> Option<Arc<Session>> {
        let mut all = self.sessions.lock();
        match all.get(token) {
            Some(s) if s.expires > Instant::now() => Some(s.clone()),
            Some(_) => {
                all.remove(token);
                None
            }
            None => None,
        }
    }

    pub fn close(&self, token: &str) {
        self.sessions.lock().remove(token);
    }

    /// A challenge for `patient` to sign: good once, for two minutes.
    pub fn challenge(&self, patient: &str) -> String {
        let c = format!("{CHALLENGE_PREFIX}:{patient}:{}", random_hex::<16>());
        let mut all = self.challenges.lock();
        let now = Instant::now();
        all.retain(|_, (_, until)| *until > now);
        if all.len() >= MAX_CHALLENGES {
            // The oldest go first.
            let mut by_age: Vec<_> = all.iter().map(|(k, (_, t))| (*t, k.clone())).collect();
            by_age.sort();
            for (_, k) in by_age.into_iter().take(MAX_CHALLENGES / 10) {
                all.remove(&k);
            }
        }
        all.insert(c.clone(), (patient.to_string(), now + CHALLENGE_TTL));
        c
    }

    /// Whether `account` may try to sign in now: not after
    /// [`MAX_FAILURES`] failures within [`LOCKOUT`] of each other, until
    /// [`LOCKOUT`] has passed since the last.
    pub fn may_try(&self, account: &str) -> bool {
        match self.failures.lock().get(account) {
            Some((n, last)) => *n < MAX_FAILURES || last.elapsed() >= LOCKOUT,
            None => true,
        }
    }

    /// Counts a failed sign-in of `account`.
    pub fn failed(&self, account: &str) {
        let mut all = self.failures.lock();
        if all.len() >= MAX_FAILING {
            all.retain(|_, (_, last)| last.elapsed() < LOCKOUT);
        }
        if all.len() >= MAX_FAILING {
            // A flood of names: the oldest go, so memory stays bounded.
            let mut by_age: Vec<_> = all.iter().map(|(k, (_, t))| (*t, k.clone())).collect();
            by_age.sort();
            for (_, k) in by_age.into_iter().take(MAX_FAILING / 10) {
                all.remove(&k);
            }
        }
        let e = all
            .entry(account.to_string())
            .or_insert((0, Instant::now()));
        if e.1.elapsed() >= LOCKOUT {
            e.0 = 0;
        }
        *e = (e.0 + 1, Instant::now());
    }

    /// Forgets an account's failures (it signed in).
    pub fn succeeded(&self, account: &str) {
        self.failures.lock().remove(account);
    }

    /// Takes a challenge issued for `patient`, if it is outstanding.
    pub fn take_challenge(&self, challenge: &str, patient: &str) -> bool {
        match self.challenges.lock().remove(challenge) {
            Some((p, until)) => p == patient && until > Instant::now(),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_distinct_and_close() {
        let s = Sessions::default();
        let (a, _) = s.open(Role::Clinician, "rn-1");
        let (b, _) = s.open(Role::Clinician, "rn-1");
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        assert_eq!(s.get(&a).unwrap().id, "rn-1");
        s.close(&a);
        assert!(s.get(&a).is_none());
        assert!(s.get(&b).is_some());
        assert!(s.get("not-a-token").is_none());
    }

    #[test]
    fn repeated_failures_make_an_account_wait() {
        let s = Sessions::default();
        for _ in 0..MAX_FAILURES {
            assert!(s.may_try("clinician:rn-1"));
            s.failed("clinician:rn-1");
        }
        assert!(!s.may_try("clinician:rn-1"));
        assert!(
            s.may_try("clinician:rn-2"),
            "other accounts are not held up"
        );
        s.succeeded("clinician:rn-1");
        assert!(s.may_try("clinician:rn-1"));
    }

    #[test]
    fn a_challenge_is_good_once_and_for_its_patient_only() {
        let s = Sessions::default();
        let c = s.challenge("p-1");
        assert!(c.starts_with("wardflow-console-login:p-1:"));
        assert!(!s.take_challenge(&c, "p-2"), "for another patient");
        // Taken (and refused) above: gone.
        assert!(!s.take_challenge(&c, "p-1"));
        let c = s.challenge("p-1");
        assert!(s.take_challenge(&c, "p-1"));
        assert!(!s.take_challenge(&c, "p-1"), "once");
    }
}
