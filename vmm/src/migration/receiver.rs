// SPDX-License-Identifier: Apache-2.0
//! The receiver: checks the incoming VM against the local configuration,
//! writes pages into guest memory (bounds-checked), restores the state,
//! answers `Ready`, and runs the guest only once the sender commits with
//! `Go`. Before `Go` every failure leaves the guest to the source; after it
//! the guest is this side's to run.

use std::io::Read;
use std::time::{Duration, Instant};

use devices::GuestMemoryMmap;
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::auth::{self, AuthBytes, Token};
use super::config::{CpuFeatures, MigrationConfig};
use super::protocol::{self, Hello, Message, Pages, ProtocolError, PAGE_SIZE};
use super::transport::Connection;
use super::{HookError, MigrationError, Result};

/// Largest device state accepted (the snapshot format's own limit).
pub const MAX_STATE_LEN: usize = 64 << 20;

/// Default of both receiver timeouts (`--migration-timeout`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the receiver waits for its sender, and whom it accepts.
#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    /// Longest the whole handshake may take, from the connection to the
    /// sender's `Config`.
    pub handshake_timeout: Duration,
    /// Longest any later frame may take to arrive whole, from the moment it
    /// is awaited (a peer trickling bytes does not reset it).
    pub frame_timeout: Duration,
    /// If set, the sender must prove it knows this token before anything
    /// else is accepted.
    pub token: Option<Token>,
}

impl Default for ReceiveOptions {
    fn default() -> Self {
        Self::with_timeout(DEFAULT_TIMEOUT)
    }
}

impl ReceiveOptions {
    /// Both timeouts `t`, no token.
    pub fn with_timeout(t: Duration) -> Self {
        Self {
            handshake_timeout: t,
            frame_timeout: t,
            token: None,
        }
    }
}

/// A stream whose reads must complete by a deadline: each read may block only
/// for what is left of it.
struct Deadline<'a, S: Connection + ?Sized> {
    inner: &'a mut S,
    deadline: Instant,
    timeout: Duration,
}

impl<S: Connection + ?Sized> Deadline<'_, S> {
    /// From now, the next reads must finish within `timeout`.
    fn arm(&mut self, timeout: Duration) {
        self.timeout = timeout;
        self.deadline = Instant::now() + timeout;
    }

    /// Reads one message by the deadline; a late one is a
    /// [`MigrationError::Timeout`] naming what was awaited.
    fn next(&mut self, waiting_for: &'static str) -> Result<Message> {
        match protocol::read_message(self) {
            Ok(m) => Ok(m),
            Err(ProtocolError::Timeout) => Err(MigrationError::Timeout(self.timeout, waiting_for)),
            Err(e) => Err(e.into()),
        }
    }
}

impl<S: Connection + ?Sized> Read for Deadline<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        self.inner.set_read_timeout(Some(left))?;
        self.inner.read(buf)
    }
}

/// What the receiver needs from the VM being built. Implemented by the VMM.
pub trait MigrationTarget {
    /// The local VM's configuration, compared with the source's.
    fn config(&self) -> MigrationConfig;
    /// CPU features this host supports (`KVM_GET_SUPPORTED_CPUID`).
    fn host_cpu(&self) -> CpuFeatures;
    /// Guest RAM to write pages into. It must start out zeroed (fresh
    /// anonymous memory): pages the source never sends stay zero.
    fn memory(&self) -> &GuestMemoryMmap;
    /// Restores devices and vCPUs from the state blob, without running the
    /// guest yet. If the migration fails afterwards the caller must drop the
    /// restored VM without touching what the source still uses (disks, TAPs).
    fn restore(&mut self, state: Vec<u8>) -> std::result::Result<(), HookError>;
    /// Runs the restored guest: the source has committed (`Go`).
    fn run(&mut self) -> std::result::Result<(), HookError>;
}

/// What a successful receive did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReceiveReport {
    /// Pages received (data and zero markers).
    pub pages: u64,
    /// Of those, zero markers.
    pub zero_pages: u64,
    /// Bytes of device state.
    pub state_bytes: usize,
    /// Handshake to `Running`.
    pub total: Duration,
}

/// Receives a VM over `stream` into `target`. Returns once the guest runs
/// here (`Go` received, [`MigrationTarget::run`] done; `Running` sent if the
/// link still works). On any failure sends `Error` (best effort) and returns
/// the error; the guest never ran here and the caller should exit. Waits
/// for the sender are bounded by `opts`' timeouts; with a token, a sender
/// that cannot prove it is refused before its configuration is even read.
pub fn receive<S: Connection + ?Sized>(
    stream: &mut S,
    target: &mut dyn MigrationTarget,
    opts: &ReceiveOptions,
) -> Result<ReceiveReport> {
    let mut report = ReceiveReport::default();
    let started = Instant::now();
    stream
        .set_write_timeout(Some(opts.frame_timeout))
        .map_err(MigrationError::Socket)?;
    let mut timed = Deadline {
        inner: stream,
        deadline: started + opts.handshake_timeout,
        timeout: opts.handshake_timeout,
    };
    match receive_inner(&mut timed, target, opts, &mut report) {
        Ok(()) => {
            report.total = started.elapsed();
            Ok(report)
        }
        Err(e) => {
            let silent = matches!(
                e,
                MigrationError::Cancelled(_)
                    | MigrationError::Peer(_)
                    | MigrationError::Refused(_)
                    | MigrationError::Unauthenticated(_)
            );
            if !silent {
                let _ = protocol::write_message(
                    timed.inner,
                    &Message::Error {
                        message: e.to_string(),
                    },
                );
            }
            Err(e)
        }
    }
}

fn receive_inner<S: Connection + ?Sized>(
    stream: &mut Deadline<'_, S>,
    target: &mut dyn MigrationTarget,
    opts: &ReceiveOptions,
    report: &mut ReceiveReport,
) -> Result<()> {
    // The handshake, up to `Config`, is bounded as a whole.
    match stream.next("the sender's Hello")? {
        Message::Hello(h) => h.check()?,
        m => return Err(unexpected("Hello", m)),
    }
    write(stream, &Message::Hello(Hello::ours()))?;
    authenticate(stream, opts.token.as_ref())?;

    let theirs = match stream.next("the sender's Config")? {
        Message::Config(c) => c,
        m => return Err(unexpected("Config", m)),
    };
    let differences = theirs.differences(&target.config(), &target.host_cpu());
    if !differences.is_empty() {
        let reason = differences.join("; ");
        write(
            stream,
            &Message::Refuse {
                reason: reason.clone(),
            },
        )?;
        return Err(MigrationError::Refused(reason));
    }
    write(stream, &Message::Accept)?;

    let mut state: Vec<u8> = Vec::new();
    let mut in_state = false;
    let mut written = WrittenPages::new(target.memory());
    loop {
        stream.arm(opts.frame_timeout);
        match stream.next("the next Pages, State or Complete frame")? {
            Message::Pages(p) if !in_state => {
                write_pages(target.memory(), &mut written, &p)?;
                report.pages += p.count as u64;
                report.zero_pages += (p.count as usize - p.data.len() / PAGE_SIZE) as u64;
            }
            Message::State(chunk) => {
                in_state = true;
                if state.len().saturating_add(chunk.len()) > MAX_STATE_LEN {
                    return Err(MigrationError::StateTooLarge { max: MAX_STATE_LEN });
                }
                state.extend_from_slice(&chunk);
            }
            Message::Complete => break,
            Message::Cancel { reason } => return Err(MigrationError::Cancelled(reason)),
            m => return Err(unexpected("Pages, State or Complete", m)),
        }
    }
    report.state_bytes = state.len();
    target
        .restore(state)
        .map_err(|source| MigrationError::Target {
            what: "restore the VM",
            source,
        })?;
    write(stream, &Message::Ready)?;
    stream.arm(opts.frame_timeout);
    match stream.next("Go")? {
        Message::Go => {}
        m => return Err(unexpected("Go", m)),
    }
    // The commit point: from here the source never runs the guest again.
    target.run().map_err(|source| MigrationError::Target {
        what: "run the VM",
        source,
    })?;
    if let Err(e) = write(stream, &Message::Running) {
        // The source committed with `Go`; it waits paused for the operator.
        log::warn!("migration: the guest runs here but the source did not hear it: {e}");
    }
    Ok(())
}

fn write<S: Connection + ?Sized>(stream: &mut Deadline<'_, S>, m: &Message) -> Result<()> {
    Ok(protocol::write_message(stream.inner, m)?)
}

/// Challenges the sender and checks its proof; refuses it (`Refuse`) if this
/// receiver has a token and the proof is missing or wrong.
fn authenticate<S: Connection + ?Sized>(
    stream: &mut Deadline<'_, S>,
    token: Option<&Token>,
) -> Result<()> {
    let ours: AuthBytes = auth::nonce()?;
    write(stream, &Message::Challenge { nonce: ours })?;
    let (theirs, proof) = match stream.next("the sender's Auth")? {
        Message::Auth { nonce, proof } => (nonce, proof),
        m => return Err(unexpected("Auth", m)),
    };
    if let Some(token) = token {
        let refusal = match proof {
            None => Some("the sender presented no migration token (this receiver requires one)"),
            Some(p) if !token.verify_sender(&ours, &theirs, &p) => {
                Some("the sender's migration token does not match this receiver's")
            }
            Some(_) => None,
        };
        if let Some(reason) = refusal {
            write(
                stream,
                &Message::Refuse {
                    reason: reason.into(),
                },
            )?;
            return Err(MigrationError::Unauthenticated(reason.into()));
        }
    }
    let proof = token.map(|t| t.receiver_proof(&ours, &theirs));
    write(stream, &Message::AuthOk { proof })
}

fn unexpected(expected: &'static str, m: Message) -> MigrationError {
    match m {
        Message::Error { message } => MigrationError::Peer(message),
        Message::Cancel { reason } => MigrationError::Cancelled(reason),
        m => MigrationError::Unexpected {
            expected,
            got: m.name(),
        },
    }
}

/// Which pages the receiver has written non-zero data to. Guest memory
/// starts zeroed, so a zero page only needs writing if it is set here; other
/// pages stay untouched (and unallocated).
#[derive(Debug, Clone)]
pub struct WrittenPages {
    regions: Vec<Vec<u64>>,
}

impl WrittenPages {
    /// Nothing written yet, for the regions of `mem`.
    pub fn new(mem: &GuestMemoryMmap) -> Self {
        let regions = mem
            .iter()
            .map(|r| vec![0; (r.len() / PAGE_SIZE as u64).div_ceil(64) as usize])
            .collect();
        Self { regions }
    }

    /// Records whether `page` of `region` now holds data; returns whether it
    /// held data before. Out-of-range pages report `true` (write to be safe).
    fn set(&mut self, region: usize, page: u64, data: bool) -> bool {
        let Some(word) = self
            .regions
            .get_mut(region)
            .and_then(|r| r.get_mut((page / 64) as usize))
        else {
            return true;
        };
        let bit = 1u64 << (page % 64);
        let was = *word & bit != 0;
        if data {
            *word |= bit;
        } else {
            *word &= !bit;
        }
        was
    }
}

/// Writes one run of pages. The run must lie inside region `p.region`;
/// vm-memory checks every access again. `written` tracks which pages hold
/// data so zero pages are only written over data.
pub fn write_pages(mem: &GuestMemoryMmap, written: &mut WrittenPages, p: &Pages) -> Result<()> {
    let out_of_range = || MigrationError::PageOutOfRange {
        region: p.region,
        first_page: p.first_page,
        count: p.count,
    };
    let region = mem.iter().nth(p.region as usize).ok_or_else(out_of_range)?;
    let region_pages = region.len() / PAGE_SIZE as u64;
    let end = p
        .first_page
        .checked_add(p.count as u64)
        .ok_or_else(out_of_range)?;
    if end > region_pages {
        return Err(out_of_range());
    }
    let mut data = p.data.chunks_exact(PAGE_SIZE);
    for i in 0..p.count {
        let page = p.first_page + i as u64;
        let offset = page * PAGE_SIZE as u64;
        let addr = MemoryRegionAddress(offset);
        let mem_err = |e: vm_memory::GuestMemoryError| MigrationError::Memory {
            region: p.region,
            offset,
            reason: e.to_string(),
        };
        if p.is_present(i) {
            let bytes = data.next().ok_or_else(out_of_range)?;
            region.write_slice(bytes, addr).map_err(mem_err)?;
            written.set(p.region as usize, page, true);
        } else if written.set(p.region as usize, page, false) {
            region
                .write_slice(&[0u8; PAGE_SIZE], addr)
                .map_err(mem_err)?;
        }
    }
    Ok(())
}
