//! Anchoring batch hashes on a Substrate chain, with subxt.
//!
//! Each batch becomes one `system.remark_with_event` whose remark is the
//! versioned payload
//!
//! ```text
//! "WFA1" || process u32 || batch u64 || from_ms u64 || to_ms u64 ||
//! leaves u64 || root (32) || prev (32)          (integers big-endian)
//! ```
//!
//! from which anyone recomputes the batch hash (docs/ledger.md), so the
//! chain holds the root, the batch's range and its link to the batch
//! before. The chain's `System.Remarked` event records the signer and the
//! remark's hash (BLAKE2b-256, the runtime's hasher), which is what
//! verification checks. When the anchorer is behind, it packs up to
//! [`MAX_PER_EXTRINSIC`] remarks into one `utility.batch_all`; it waits for
//! each extrinsic to be finalized before sending the next, so there is at
//! most one in flight and one per block at any ingest rate.
//!
//! The signed local anchor log is the durable queue: a batch is on it
//! before it is submitted, and the receipt log (`chain-p{process}.jsonl`:
//! block hash, number and extrinsic index per range of batches, fsynced)
//! says which are anchored. After a restart or a chain outage, what has no
//! receipt is submitted again, in order.
//!
//! Anchoring is exactly once. An extrinsic is recorded as in flight
//! (`chain-p{process}.inflight.json`: its batches, nonce, mortal era and
//! signed bytes) before it is sent, and stays the only one until it is
//! finalized or can never be: its nonce went to another extrinsic, or its
//! era ended. A timeout, a broken watch or a restart leads to looking for
//! it on the chain (see [`InFlight`]), and to sending the same bytes again
//! while it can still land, never to signing its batches a second time.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::str::FromStr as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use serde::{Deserialize, Serialize};
use subxt::dynamic::{self, Value};
use subxt::{OnlineClient, PolkadotConfig};
use subxt_signer::SecretUri;
pub use subxt_signer::sr25519::Keypair;

use crate::anchor::{Anchor, AnchorError};

/// The most remarks in one `utility.batch_all`.
pub const MAX_PER_EXTRINSIC: usize = 256;

/// The chain payload of one anchored batch.
pub fn remark_payload(a: &Anchor) -> Vec<u8> {
    let mut p = Vec::with_capacity(4 + 4 + 8 * 4 + 64);
    p.extend_from_slice(b"WFA1");
    p.extend_from_slice(&a.process.to_be_bytes());
    p.extend_from_slice(&a.batch.to_be_bytes());
    p.extend_from_slice(&a.from_ms.to_be_bytes());
    p.extend_from_slice(&a.to_ms.to_be_bytes());
    p.extend_from_slice(&a.leaves.to_be_bytes());
    p.extend_from_slice(&a.root);
    p.extend_from_slice(&a.prev);
    p
}

/// Where a run of batches was anchored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub process: u32,
    pub first_batch: u64,
    pub last_batch: u64,
    /// `0x`-prefixed hex, as the chain's RPC writes hashes.
    pub block_hash: String,
    pub block_number: u64,
    pub extrinsic_index: u32,
    /// The signing account (sr25519 public key, hex).
    pub account: String,
}

impl Receipt {
    pub fn covers(&self, batch: u64) -> bool {
        (self.first_batch..=self.last_batch).contains(&batch)
    }
}

/// Process `process`'s receipt log in the ledger directory `dir`.
pub fn receipt_log_path(dir: &Path, process: u32) -> PathBuf {
    dir.join(format!("chain-p{process}.jsonl"))
}

/// Reads a receipt log; a torn last line is skipped.
pub fn read_receipts(path: &Path) -> Result<Vec<Receipt>, AnchorError> {
    crate::anchor::read_json_lines(path)
}

/// The node's chain account: a secret URI (`//Alice` for a development
/// chain, a mnemonic, or a `0x` seed).
pub fn load_signer(suri: &str) -> Result<Keypair, String> {
    let uri = SecretUri::from_str(suri).map_err(|e| format!("not a secret URI: {e}"))?;
    Keypair::from_uri(&uri).map_err(|e| format!("not a usable sr25519 key: {e}"))
}

/// Reads the node's secret URI from `path`, creating a new random seed
/// there (owner-only) if there is none.
pub fn load_or_create_suri(path: &Path) -> Result<String, AnchorError> {
    let io = |source| AnchorError::Io {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::read_to_string(path) {
        Ok(s) => return Ok(s.trim().to_string()),
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
        Err(_) => {}
    }
    let mut seed = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed).map_err(|_| {
        AnchorError::Key {
            path: path.to_path_buf(),
            what: "no randomness for a new key".into(),
        }
    })?;
    let suri = format!("0x{}", hex(&seed));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    crate::anchor::write_private(path, format!("{suri}\n").as_bytes())?;
    Ok(std::fs::read_to_string(path)
        .map_err(io)?
        .trim()
        .to_string())
}

pub use crate::hex;

/// What the anchorer reports (read by the engine's metrics).
#[derive(Debug, Default)]
pub struct ChainStatus {
    pub pending_batches: AtomicU64,
    pub anchored_batches: AtomicU64,
    pub extrinsics: AtomicU64,
    pub errors: AtomicU64,
    pub last_block: AtomicU64,
    pub connected: AtomicBool,
}

/// What the anchorer needs.
#[derive(Clone)]
pub struct ChainConfig {
    pub url: String,
    pub signer: Keypair,
    /// How long one extrinsic may take from submission to finality.
    pub timeout: Duration,
}

/// Submits anchored batches to the chain on a thread of its own.
pub struct ChainAnchorer {
    tx: Option<Sender<Anchor>>,
    join: Option<JoinHandle<()>>,
    pub status: Arc<ChainStatus>,
    stop: Arc<AtomicBool>,
}

impl ChainAnchorer {
    /// Starts anchoring `backlog` (batches of the anchor log without a
    /// receipt, in order), then whatever [`ChainAnchorer::submit`] adds.
    pub fn start(
        config: ChainConfig,
        process: u32,
        ledger_dir: &Path,
        backlog: Vec<Anchor>,
    ) -> std::io::Result<ChainAnchorer> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let status = Arc::new(ChainStatus::default());
        status
            .pending_batches
            .store(backlog.len() as u64, Ordering::Relaxed);
        let stop = Arc::new(AtomicBool::new(false));
        let in_flight_path = in_flight_path(ledger_dir, process);
        let in_flight = read_in_flight(&in_flight_path).unwrap_or_else(|e| {
            // Unreadable: its batches are looked for no more and sent again.
            tracing::warn!("ledger: {e}; the batches it names are sent again");
            None
        });
        let mut worker = Worker {
            config,
            receipts: receipt_log_path(ledger_dir, process),
            in_flight_path,
            in_flight,
            queue: backlog.into(),
            rx,
            status: status.clone(),
            stop: stop.clone(),
            process,
        };
        let join = std::thread::Builder::new()
            .name(format!("chain-p{process}"))
            .spawn(move || worker.run())?;
        Ok(ChainAnchorer {
            tx: Some(tx),
            join: Some(join),
            status,
            stop,
        })
    }

    /// Queues a batch just anchored locally.
    pub fn submit(&self, a: Anchor) {
        self.status.pending_batches.fetch_add(1, Ordering::Relaxed);
        if let Some(tx) = &self.tx {
            let _ = tx.send(a);
        }
    }

    /// Stops. An extrinsic in flight is given a few seconds to settle;
    /// whatever has no receipt is anchored after the next start.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.tx = None;
        if let Some(j) = self.join.take() {
            let end = std::time::Instant::now() + Duration::from_secs(5);
            while !j.is_finished() && std::time::Instant::now() < end {
                std::thread::sleep(Duration::from_millis(20));
            }
            if j.is_finished() {
                let _ = j.join();
            } else {
                tracing::warn!(
                    "ledger: left an anchoring extrinsic unsettled at shutdown; it is sent again on the next start"
                );
            }
        }
    }
}

/// The batches of `anchors` that no receipt covers.
pub fn backlog(anchors: &[Anchor], receipts: &[Receipt]) -> Vec<Anchor> {
    let done = receipts.iter().map(|r| r.last_batch).max();
    anchors
        .iter()
        .filter(|a| done.is_none_or(|d| a.batch > d))
        .cloned()
        .collect()
}

/// Blocks an anchoring extrinsic stays valid for (its mortal era). Once
/// the finalized head is past them, it can no longer land.
pub const MORTALITY_BLOCKS: u64 = 64;

/// Process `process`'s record of its anchoring extrinsic in flight.
pub fn in_flight_path(dir: &Path, process: u32) -> PathBuf {
    dir.join(format!("chain-p{process}.inflight.json"))
}

/// An anchoring extrinsic that was sent and is not yet known to be
/// finalized, nor to be unable to ever be. It is on disk before it is sent,
/// so that a restart looks for it instead of anchoring its batches twice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InFlight {
    pub first_batch: u64,
    pub last_batch: u64,
    /// The signing account's nonce it uses. Once the chain has finalized
    /// an extrinsic of the account with this nonce, no other can use it.
    pub nonce: u64,
    /// The finalized block it was signed at: it is valid for
    /// [`MORTALITY_BLOCKS`] from there.
    pub birth: u64,
    /// The signed extrinsic (hex), sent again byte for byte while it may
    /// still land: the same bytes can be included at most once.
    pub extrinsic: String,
}

impl InFlight {
    fn batches(&self) -> usize {
        (self.last_batch - self.first_batch + 1) as usize
    }
}

/// Reads the record of the extrinsic in flight, if there is one.
pub fn read_in_flight(path: &Path) -> Result<Option<InFlight>, AnchorError> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| crate::anchor::io_err(path)(std::io::Error::other(e))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(crate::anchor::io_err(path)(e)),
    }
}

/// Replaces the record atomically and durably (written aside, fsynced,
/// renamed, directory fsynced).
fn write_in_flight(path: &Path, f: &InFlight) -> Result<(), AnchorError> {
    use std::io::Write as _;
    let io = crate::anchor::io_err;
    let tmp = path.with_extension("json.tmp");
    let mut file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    file.write_all(&serde_json::to_vec(f).expect("serializes"))
        .map_err(io(&tmp))?;
    file.sync_data().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
    }
    Ok(())
}

/// What became of an extrinsic in flight.
enum Fate {
    /// Finalized, with the remark of every batch: its receipt.
    Finalized(Receipt),
    /// It can no longer land (why); its batches go in a new extrinsic.
    Dead(String),
    /// It may still land; it was sent again, to be looked for later.
    Pending,
}

/// Why a pass of the anchorer made no progress.
enum Retry {
    /// The chain was slow to answer, or a local write failed: the same
    /// connection is used again after a pause. (Connecting again costs a
    /// slow chain more: the client reads the runtime's metadata.)
    Later(String),
    /// The connection or the node failed: it is made again.
    Reconnect(String),
}

impl From<tokio::time::error::Elapsed> for Retry {
    fn from(_: tokio::time::error::Elapsed) -> Retry {
        Retry::Later("no answer from the chain within the timeout".into())
    }
}

struct Worker {
    config: ChainConfig,
    receipts: PathBuf,
    in_flight_path: PathBuf,
    in_flight: Option<InFlight>,
    queue: VecDeque<Anchor>,
    rx: Receiver<Anchor>,
    status: Arc<ChainStatus>,
    stop: Arc<AtomicBool>,
    process: u32,
}

type Connection = (ChainClient, subxt::rpcs::RpcClient);

impl Worker {
    fn run(&mut self) {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!("chain anchoring cannot start: {e}");
                return;
            }
        };
        let mut client: Option<Connection> = None;
        let mut backoff = Duration::from_millis(500);
        let mut closed = false;
        loop {
            // Take what arrived; wait a little when there is nothing to do.
            if self.queue.is_empty() && !closed {
                match self.rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(a) => self.queue.push_back(a),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => closed = true,
                }
            }
            while let Ok(a) = self.rx.try_recv() {
                self.queue.push_back(a);
            }
            if self.stop.load(Ordering::Relaxed) || (closed && self.queue.is_empty()) {
                return;
            }
            if self.queue.is_empty() {
                continue;
            }
            // A record whose batches are not at the head of the queue is
            // spent: a receipt covers them.
            if let Some(f) = &self.in_flight
                && (self.queue.front().map(|a| a.batch) != Some(f.first_batch)
                    || self.queue.len() < f.batches())
            {
                self.clear_in_flight();
            }
            let conn = match &client {
                Some(c) => c.clone(),
                None => match rt.block_on(connect_with_rpc(&self.config.url)) {
                    Ok(c) => {
                        tracing::info!(url = %self.config.url, "ledger: connected to the chain");
                        self.status.connected.store(true, Ordering::Relaxed);
                        backoff = Duration::from_millis(500);
                        client = Some(c.clone());
                        c
                    }
                    Err(e) => {
                        self.fail(&mut backoff, e);
                        continue;
                    }
                },
            };
            let done = match self.in_flight.clone() {
                None => self.send(&rt, &conn.0),
                Some(f) => self.follow_up(&rt, &conn, &f),
            };
            match done {
                Ok(()) => {}
                Err(Retry::Later(why)) => self.fail(&mut backoff, why),
                Err(Retry::Reconnect(why)) => {
                    client = None;
                    self.status.connected.store(false, Ordering::Relaxed);
                    self.fail(&mut backoff, why);
                }
            }
        }
    }

    /// Runs `f` on `rt`, for at most the configured timeout.
    fn within<T>(
        &self,
        rt: &tokio::runtime::Runtime,
        f: impl std::future::Future<Output = T>,
    ) -> Result<T, tokio::time::error::Elapsed> {
        rt.block_on(async { tokio::time::timeout(self.config.timeout, f).await })
    }

    /// Signs the batches at the head of the queue into one extrinsic,
    /// records it as in flight, sends it and follows it to finality.
    fn send(&mut self, rt: &tokio::runtime::Runtime, api: &ChainClient) -> Result<(), Retry> {
        let n = self.queue.len().min(MAX_PER_EXTRINSIC);
        let remarks = self.queue.iter().take(n).map(remark_payload).collect();
        let (tx, nonce, birth) = self
            .within(rt, sign_remarks(api, &self.config.signer, remarks))?
            .map_err(Retry::Reconnect)?;
        let f = InFlight {
            first_batch: self.queue[0].batch,
            last_batch: self.queue[n - 1].batch,
            nonce,
            birth,
            extrinsic: hex(tx.encoded()),
        };
        write_in_flight(&self.in_flight_path, &f).map_err(|e| Retry::Later(e.to_string()))?;
        self.in_flight = Some(f);
        let followed = self.within(rt, async {
            let progress = tx
                .submit_and_watch()
                .await
                .map_err(|e| format!("submitting: {e}"))?;
            follow_to_finality(api, progress, n).await
        });
        let why = match followed {
            Ok(Ok((block_hash, block_number, extrinsic_index))) => {
                return self.anchored(Receipt {
                    process: self.process,
                    first_batch: self.queue[0].batch,
                    last_batch: self.queue[n - 1].batch,
                    block_hash,
                    block_number,
                    extrinsic_index,
                    account: hex(&self.config.signer.public_key().0),
                });
            }
            Ok(Err(e)) => e,
            Err(_) => format!("not finalized within {:?}", self.config.timeout),
        };
        // It may still land: the next pass looks for it on the chain and
        // sends the same bytes again meanwhile, never a second extrinsic.
        self.status.errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            url = %self.config.url,
            nonce,
            "ledger: lost sight of the anchoring extrinsic ({why}); looking for it on the chain"
        );
        Ok(())
    }

    /// Looks for the extrinsic in flight on the chain: records its receipt
    /// once finalized, gives it up once it can no longer land, and
    /// otherwise sends it again and waits.
    fn follow_up(
        &mut self,
        rt: &tokio::runtime::Runtime,
        (api, rpc): &Connection,
        f: &InFlight,
    ) -> Result<(), Retry> {
        let batches: Vec<Anchor> = self.queue.iter().take(f.batches()).cloned().collect();
        let fate = self
            .within(
                rt,
                fate(api, rpc, f, &self.config.signer, &batches, self.process),
            )?
            .map_err(Retry::Reconnect)?;
        match fate {
            Fate::Finalized(receipt) => {
                tracing::info!(
                    block_number = receipt.block_number,
                    "ledger: found the anchoring extrinsic finalized on the chain"
                );
                self.anchored(receipt)
            }
            Fate::Dead(why) => {
                tracing::warn!(
                    first_batch = f.first_batch,
                    last_batch = f.last_batch,
                    "ledger: the anchoring extrinsic can no longer land ({why}); its batches go in a new one"
                );
                self.clear_in_flight();
                Ok(())
            }
            Fate::Pending => {
                self.pause(Duration::from_secs(1));
                Ok(())
            }
        }
    }

    /// Records a finalized extrinsic's receipt and takes its batches off
    /// the queue. If the receipt cannot be written, the extrinsic stays in
    /// flight and is found on the chain again.
    fn anchored(&mut self, receipt: Receipt) -> Result<(), Retry> {
        crate::anchor::append_json_lines(&self.receipts, std::slice::from_ref(&receipt))
            .map_err(|e| Retry::Later(format!("{}: {e}", self.receipts.display())))?;
        let n = (receipt.last_batch - receipt.first_batch + 1) as usize;
        self.clear_in_flight();
        self.queue.drain(..n);
        let s = &self.status;
        s.pending_batches.fetch_sub(n as u64, Ordering::Relaxed);
        s.anchored_batches.fetch_add(n as u64, Ordering::Relaxed);
        s.extrinsics.fetch_add(1, Ordering::Relaxed);
        s.last_block.store(receipt.block_number, Ordering::Relaxed);
        tracing::debug!(
            batches = n,
            block_number = receipt.block_number,
            extrinsic_index = receipt.extrinsic_index,
            "ledger: anchored on the chain"
        );
        Ok(())
    }

    fn clear_in_flight(&mut self) {
        self.in_flight = None;
        match std::fs::remove_file(&self.in_flight_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            // Harmless: a stale record is spent once a receipt covers it.
            Err(e) => tracing::warn!("{}: {e}", self.in_flight_path.display()),
        }
    }

    fn fail(&self, backoff: &mut Duration, why: String) {
        self.status.errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            url = %self.config.url,
            pending = self.queue.len(),
            "ledger: chain anchoring failed, retrying in {:?} (batches stay queued in the anchor log): {why}",
            *backoff
        );
        self.pause(*backoff);
        *backoff = (*backoff * 2).min(Duration::from_secs(10));
    }

    /// Sleeps in slices, so a stop is not held up.
    fn pause(&self, d: Duration) {
        let end = std::time::Instant::now() + d;
        while std::time::Instant::now() < end && !self.stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A signed extrinsic, ready to send.
type Signed = subxt::transactions::SubmittableTransaction<
    PolkadotConfig,
    subxt::client::OnlineClientAtBlockImpl<PolkadotConfig>,
>;

/// Signs `remarks` as one extrinsic (a `remark_with_event`, or a
/// `utility.batch_all` of them) at the finalized head, with the account's
/// nonce there and a mortal era of [`MORTALITY_BLOCKS`]; returns it with
/// its nonce and the block it was signed at.
async fn sign_remarks(
    api: &ChainClient,
    signer: &Keypair,
    remarks: Vec<Vec<u8>>,
) -> Result<(Signed, u64, u64), String> {
    let at = api
        .at_current_block()
        .await
        .map_err(|e| format!("reading the chain head: {e}"))?;
    let mut txs = at.transactions();
    let nonce = txs
        .account_nonce(&subxt::utils::AccountId32(signer.public_key().0))
        .await
        .map_err(|e| format!("reading the account's nonce: {e}"))?;
    let params = subxt::config::PolkadotExtrinsicParamsBuilder::<PolkadotConfig>::new()
        .nonce(nonce)
        .mortal(MORTALITY_BLOCKS)
        .build();
    let signed = if remarks.len() == 1 {
        let call = dynamic::tx(
            "System",
            "remark_with_event",
            (Value::from_bytes(&remarks[0]),),
        );
        txs.create_signed(&call, signer, params).await
    } else {
        let call = dynamic::tx("Utility", "batch_all", (remark_calls(&remarks),));
        txs.create_signed(&call, signer, params).await
    }
    .map_err(|e| format!("signing: {e}"))?;
    Ok((signed, nonce, at.block_number()))
}

fn remark_calls(remarks: &[Vec<u8>]) -> Vec<Value> {
    remarks
        .iter()
        .map(|r| {
            Value::unnamed_variant(
                "System",
                [Value::named_variant(
                    "remark_with_event",
                    [("remark", Value::from_bytes(r))],
                )],
            )
        })
        .collect()
}

/// Follows a sent extrinsic of `count` remarks to finality; returns (block
/// hash, block number, extrinsic index).
async fn follow_to_finality(
    api: &ChainClient,
    progress: subxt::transactions::TransactionProgress<
        PolkadotConfig,
        subxt::client::OnlineClientAtBlockImpl<PolkadotConfig>,
    >,
    count: usize,
) -> Result<(String, u64, u32), String> {
    let in_block = progress
        .wait_for_finalized()
        .await
        .map_err(|e| format!("following to finality: {e}"))?;
    let events = in_block
        .wait_for_success()
        .await
        .map_err(|e| format!("the extrinsic failed: {e}"))?;
    let remarked = events
        .iter()
        .filter_map(Result::ok)
        .filter(|e| e.pallet_name() == "System" && e.event_name() == "Remarked")
        .count();
    if remarked != count {
        return Err(format!(
            "{remarked} System.Remarked events for {count} remarks"
        ));
    }
    let hash = in_block.block_hash();
    let number = api
        .at_block(hash)
        .await
        .map_err(|e| format!("reading the block: {e}"))?
        .block_number();
    Ok((
        format!("0x{}", hex(hash.as_ref())),
        number,
        events.extrinsic_index() as u32,
    ))
}

/// What became of `f`, whose batches are `batches`.
///
/// If the account's nonce at the finalized head is past `f`'s, an
/// extrinsic with `f`'s nonce is finalized, within `f`'s era: its blocks
/// are searched for the first batch's `System.Remarked` event, and the
/// extrinsic found must hold every batch. If none does, the nonce went to
/// another extrinsic and `f` can never land. If the nonce is not past, `f`
/// can still land until its era ends; it is sent again unless the node's
/// pool holds it (a node that restarted has forgotten its pool).
async fn fate(
    api: &ChainClient,
    rpc: &subxt::rpcs::RpcClient,
    f: &InFlight,
    signer: &Keypair,
    batches: &[Anchor],
    process: u32,
) -> Result<Fate, String> {
    let head = api
        .at_current_block()
        .await
        .map_err(|e| format!("reading the chain head: {e}"))?;
    let finalized = head.block_number();
    let nonce = head
        .transactions()
        .account_nonce(&subxt::utils::AccountId32(signer.public_key().0))
        .await
        .map_err(|e| format!("reading the account's nonce: {e}"))?;
    let era_end = f.birth + MORTALITY_BLOCKS + 1;
    if nonce > f.nonce {
        let account = signer.public_key().0;
        let want = remarked(&account, &batches[0]);
        let all: Vec<&Anchor> = batches.iter().collect();
        for number in f.birth..=finalized.min(era_end) {
            let at = api
                .at_block(number)
                .await
                .map_err(|e| format!("reading block #{number}: {e}"))?;
            let events = at
                .events()
                .fetch()
                .await
                .map_err(|e| format!("events of block #{number}: {e}"))?;
            let Some(subxt::events::Phase::ApplyExtrinsic(index)) = events
                .iter()
                .filter_map(Result::ok)
                .find(|e| {
                    e.pallet_name() == "System"
                        && e.event_name() == "Remarked"
                        && e.field_bytes() == want
                })
                .map(|e| e.phase())
            else {
                continue;
            };
            // The extrinsic must have remarked every batch; checked on the
            // events already read.
            if first_unremarked(&events, index, &account, &all).is_none() {
                return Ok(Fate::Finalized(Receipt {
                    process,
                    first_batch: f.first_batch,
                    last_batch: f.last_batch,
                    block_hash: format!("0x{}", hex(at.block_ref().hash().as_ref())),
                    block_number: number,
                    extrinsic_index: index,
                    account: hex(&account),
                }));
            }
        }
        return Ok(Fate::Dead(format!(
            "its nonce {} went to another extrinsic",
            f.nonce
        )));
    }
    if finalized > era_end {
        return Ok(Fate::Dead(format!(
            "its era ended before finalized block #{finalized}"
        )));
    }
    let ours = format!("0x{}", f.extrinsic);
    let pool: Vec<String> = rpc
        .request("author_pendingExtrinsics", subxt::rpcs::rpc_params![])
        .await
        .map_err(|e| format!("reading the node's pending extrinsics: {e}"))?;
    if pool.contains(&ours) {
        return Ok(Fate::Pending);
    }
    let sent: Result<serde_json::Value, _> = rpc
        .request("author_submitExtrinsic", subxt::rpcs::rpc_params![ours])
        .await;
    if let Err(e) = sent {
        // Transaction-pool errors (JSON-RPC 1010 with its reason): an era
        // or genesis the chain no longer knows is final; a copy already
        // held, a nonce used in a block not yet finalized, or a ban on a
        // copy just included are not.
        let why = e.to_string();
        if why.contains("ancient birth block") || why.contains("bad signature") {
            return Ok(Fate::Dead(format!("the chain refuses it: {why}")));
        }
        tracing::debug!("ledger: sending the anchoring extrinsic again: {why}");
    }
    Ok(Fate::Pending)
}

/// For a command-line tool: connects to `url`, submits `remark` signed by
/// `signer` and waits up to `timeout` for it to be finalized, on a runtime
/// of its own; returns (block hash, block number, extrinsic index).
pub fn submit_remark_blocking(
    url: &str,
    signer: &Keypair,
    remark: Vec<u8>,
    timeout: Duration,
) -> Result<(String, u64, u32), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let api = connect(url).await?;
        tokio::time::timeout(timeout, async {
            let (tx, _, _) = sign_remarks(&api, signer, vec![remark]).await?;
            let progress = tx
                .submit_and_watch()
                .await
                .map_err(|e| format!("submitting: {e}"))?;
            follow_to_finality(&api, progress, 1).await
        })
        .await
        .map_err(|_| "the chain did not finalize it in time".to_string())?
    })
}

/// A connection to the chain.
pub type ChainClient = OnlineClient<PolkadotConfig>;

/// Connects to the chain's WebSocket RPC endpoint (`ws://` or `wss://`).
///
/// Through the legacy RPC methods (`author_submitAndWatchExtrinsic`,
/// `chain_*`, `state_*`), which every Substrate node serves; subxt's
/// default picks the newer `chainHead`/`transactionWatch` methods when a
/// node lists them, and not every node that lists them serves them all.
pub async fn connect(url: &str) -> Result<ChainClient, String> {
    connect_with_rpc(url).await.map(|(c, _)| c)
}

/// Like [`connect`], also returning the raw RPC client under it (for
/// requests subxt's typed client makes expensive, such as reading a block
/// without executing the runtime).
pub async fn connect_with_rpc(url: &str) -> Result<(ChainClient, subxt::rpcs::RpcClient), String> {
    use subxt::backend::LegacyBackend;
    use subxt::rpcs::RpcClient;
    let connecting = async {
        let rpc = if url.starts_with("wss://") {
            RpcClient::from_url(url).await
        } else {
            RpcClient::from_insecure_url(url).await
        }
        .map_err(|e| e.to_string())?;
        let backend = LegacyBackend::<PolkadotConfig>::builder().build(rpc.clone());
        ChainClient::from_backend(Arc::new(backend))
            .await
            .map(|c| (c, rpc))
            .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(Duration::from_secs(10), connecting).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(format!("cannot connect to {url}: {e}")),
        Err(_) => Err(format!("connecting to {url} timed out")),
    }
}

/// The outcome of checking one receipt's batches on the chain.
#[derive(Debug)]
pub enum OnChain {
    /// Every batch's remark is in the block's extrinsic, signed by the
    /// receipt's account.
    Verified,
    Missing(String),
}

/// Checks that the block of `receipt` holds, at its extrinsic, a
/// `System.Remarked` event from the receipt's account for the payload of
/// every batch in `anchors` (the receipt's range).
pub async fn check_receipt(api: &ChainClient, receipt: &Receipt, anchors: &[&Anchor]) -> OnChain {
    let Some(hash) = parse_hash(&receipt.block_hash) else {
        return OnChain::Missing(format!("not a block hash: {}", receipt.block_hash));
    };
    let at = match api.at_block(hash).await {
        Ok(at) => at,
        Err(e) => return OnChain::Missing(format!("block {}: {e}", receipt.block_hash)),
    };
    if at.block_number() != receipt.block_number {
        return OnChain::Missing(format!(
            "block {} is number {}, not {}",
            receipt.block_hash,
            at.block_number(),
            receipt.block_number
        ));
    }
    let events = match at.events().fetch().await {
        Ok(e) => e,
        Err(e) => return OnChain::Missing(format!("events of block {}: {e}", receipt.block_hash)),
    };
    let account: [u8; 32] = match parse_hash(&format!("0x{}", receipt.account)) {
        Some(a) => a.0,
        None => return OnChain::Missing(format!("not an account: {}", receipt.account)),
    };
    match first_unremarked(&events, receipt.extrinsic_index, &account, anchors) {
        None => OnChain::Verified,
        Some(batch) => OnChain::Missing(format!(
            "batch {batch}: no remark of it by {} in block #{} extrinsic {}",
            receipt.account, receipt.block_number, receipt.extrinsic_index
        )),
    }
}

/// The `System.Remarked` event data of `batch` anchored by `account`: the
/// signer, then the remark's BLAKE2b-256 hash.
fn remarked(account: &[u8; 32], batch: &Anchor) -> [u8; 64] {
    let mut want = [0u8; 64];
    want[..32].copy_from_slice(account);
    want[32..].copy_from_slice(&blake2_256(&remark_payload(batch)));
    want
}

/// The first of `anchors` whose remark by `account` is not among the
/// `System.Remarked` events extrinsic `index` emitted in `events`.
fn first_unremarked(
    events: &subxt::events::Events<PolkadotConfig>,
    index: u32,
    account: &[u8; 32],
    anchors: &[&Anchor],
) -> Option<u64> {
    let phase = subxt::events::Phase::ApplyExtrinsic(index);
    let mut remarks: Vec<[u8; 64]> = events
        .iter()
        .filter_map(Result::ok)
        .filter(|e| {
            e.phase() == phase && e.pallet_name() == "System" && e.event_name() == "Remarked"
        })
        .filter_map(|e| e.field_bytes().try_into().ok())
        .collect();
    remarks.sort();
    anchors
        .iter()
        .find(|a| remarks.binary_search(&remarked(account, a)).is_err())
        .map(|a| a.batch)
}

fn parse_hash(s: &str) -> Option<subxt::utils::H256> {
    let bytes = crate::consent::unhex(s.strip_prefix("0x")?)?;
    Some(subxt::utils::H256(bytes.try_into().ok()?))
}

/// BLAKE2b-256, the hash `System.Remarked` reports (the runtime's
/// `Hashing`, as in every Substrate chain built on `BlakeTwo256`).
pub fn blake2_256(data: &[u8]) -> [u8; 32] {
    use blake2::Digest as _;
    blake2::Blake2b::<blake2::digest::consts::U32>::digest(data).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blake2_256_matches_the_reference_vector() {
        // BLAKE2b-256 of the empty string (RFC 7693 parameters, 32-byte digest).
        assert_eq!(
            hex(&blake2_256(b"")),
            "0e5751c026e543b2e8ab2eb06099daa1d1e5df47778f7787faab45cdf12fe3a8"
        );
    }

    #[test]
    fn the_backlog_is_what_no_receipt_covers() {
        let dir = tempfile::tempdir().unwrap();
        let key = crate::NodeKey::load_or_create(&dir.path().join("k")).unwrap();
        let mut log = crate::AnchorLog::open(&dir.path().join("a.jsonl")).unwrap();
        let mut sealer = crate::Sealer::new(0, None);
        let anchors: Vec<Anchor> = (0..5)
            .map(|i| {
                let b = sealer.seal(i * 10, i * 10 + 10, vec![crate::leaf_hash(&[i as u8])]);
                log.append(&key, &b.header).unwrap()
            })
            .collect();
        let r = Receipt {
            process: 0,
            first_batch: 0,
            last_batch: 2,
            block_hash: format!("0x{}", "ab".repeat(32)),
            block_number: 7,
            extrinsic_index: 1,
            account: "00".repeat(32),
        };
        let path = dir.path().join("chain-p0.jsonl");
        crate::anchor::append_json_lines(&path, std::slice::from_ref(&r)).unwrap();
        let read = read_receipts(&path).unwrap();
        assert_eq!(read, vec![r]);
        let rest: Vec<u64> = backlog(&anchors, &read).iter().map(|a| a.batch).collect();
        assert_eq!(rest, vec![3, 4]);
        assert_eq!(remark_payload(&anchors[3]).len(), 4 + 4 + 32 + 64);
        assert!(remark_payload(&anchors[3]).starts_with(b"WFA1"));
    }

    #[test]
    fn the_in_flight_record_survives_a_restart_and_a_torn_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = in_flight_path(dir.path(), 3);
        assert_eq!(read_in_flight(&path).unwrap(), None);
        let f = InFlight {
            first_batch: 40,
            last_batch: 47,
            nonce: 9,
            birth: 1200,
            extrinsic: "45028400".into(),
        };
        write_in_flight(&path, &f).unwrap();
        assert_eq!(read_in_flight(&path).unwrap(), Some(f.clone()));
        assert_eq!(f.batches(), 8);
        // Replaced whole, never appended to.
        let g = InFlight { nonce: 10, ..f };
        write_in_flight(&path, &g).unwrap();
        assert_eq!(read_in_flight(&path).unwrap(), Some(g));
        std::fs::write(&path, "{\"first_batch\": 4").unwrap();
        let e = read_in_flight(&path).unwrap_err().to_string();
        assert!(e.contains("chain-p3.inflight.json"), "{e}");
    }
}
