// SPDX-License-Identifier: Apache-2.0
//! The VMM process's main loop: one event loop for the API socket, signals,
//! console input and the VM's end events, and the API's state rules (what may
//! be set before boot, what after).

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};

use api::models::{ActionType, ApiFault, InstanceInfo, InstanceState, VmState, VmmVersion};
use api::{ApiCall, ApiRequest, ApiResponse, ApiServerHandle};
use devices::bus::lock;
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::config::SerialConfig;
use crate::preboot::{self, Preboot};
use crate::terminal::{stdin_is_tty, RawModeGuard};
use crate::vmm::{Outcome, Subscriber, Vmm};

mod migration;

/// How the process was started.
#[derive(Debug)]
pub struct RuntimeOptions {
    /// Instance id (`GET /`).
    pub id: String,
    /// API socket to serve, if any.
    pub api_sock: Option<PathBuf>,
    /// Initial configuration (command line or config file).
    pub preboot: Preboot,
    /// Boot at once instead of waiting for `InstanceStart`.
    pub boot_now: bool,
    /// Where to register for `wisp list` (name, directory), if anywhere.
    pub register: Option<(String, PathBuf)>,
    /// Whether a failure to register is fatal (the user named the VM).
    pub register_required: bool,
    /// Metrics file or FIFO from the command line.
    pub metrics_path: Option<PathBuf>,
    /// Restore this snapshot at start: (state file, memory file, resume).
    pub restore: Option<(PathBuf, PathBuf, bool)>,
    /// Wait for an incoming live migration on this URI.
    pub incoming: Option<String>,
    /// Receiver timeout, seconds, for the handshake and each frame
    /// (`--migration-timeout`; default 30). The API's receive request may
    /// override it.
    pub migration_timeout_s: Option<u64>,
    /// Migration token file for receives and sends
    /// (`--migration-token-file`). The API's requests may override it.
    pub migration_token_file: Option<PathBuf>,
    /// Install the seccomp filters of `crate::seccomp` (off with
    /// `--no-seccomp`).
    pub seccomp: bool,
}

/// Why the runtime could not start.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The API socket could not be served.
    #[error("Cannot serve the API socket: {0}")]
    Api(#[from] api::ApiError),
    /// The event loop could not be created.
    #[error("Cannot create the event loop: {0}")]
    EventLoop(String),
    /// Booting failed (before any API was served).
    #[error("{0}")]
    Boot(String),
    /// The metrics file could not be opened.
    #[error("Cannot open metrics file {path}: {source}")]
    Metrics {
        /// The path given.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Registration in the runtime directory failed.
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
}

const EV_SIGNAL: u32 = 0;
const EV_API: u32 = 1;
const EV_MIGRATION: u32 = 2;

/// Signals and API wake-ups.
struct Wakeups {
    signal_fd: i32,
    api_fd: Option<i32>,
    migration_fd: i32,
    signal: Arc<Mutex<Option<Outcome>>>,
    api_pending: Arc<Mutex<bool>>,
    migration_pending: Arc<Mutex<bool>>,
}

impl MutEventSubscriber for Wakeups {
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::with_data_raw(
            self.signal_fd,
            EV_SIGNAL,
            EventSet::IN,
        ));
        if let Some(fd) = self.api_fd {
            let _ = ops.add(Events::with_data_raw(fd, EV_API, EventSet::IN));
        }
        let _ = ops.add(Events::with_data_raw(
            self.migration_fd,
            EV_MIGRATION,
            EventSet::IN,
        ));
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        crate::vmm::drain_eventfd(events.fd());
        match events.data() {
            EV_SIGNAL => {
                lock(&self.signal).get_or_insert(Outcome::Signal(crate::signals::last_signal()));
            }
            EV_API => *lock(&self.api_pending) = true,
            EV_MIGRATION => *lock(&self.migration_pending) = true,
            _ => {}
        }
    }
}

/// The running VMM process.
pub struct Runtime {
    em: EventManager<Subscriber>,
    outcome: Arc<Mutex<Option<Outcome>>>,
    api_pending: Arc<Mutex<bool>>,
    api: Option<(ApiServerHandle, Receiver<ApiCall>)>,
    _api_evt: Option<EventFd>,
    id: String,
    preboot: Preboot,
    vmm: Option<Vmm>,
    paused: bool,
    raw_mode: Option<RawModeGuard>,
    registration: Option<crate::registry::Registration>,
    metrics: Option<crate::metrics::MetricsSink>,
    last_metrics: std::time::Instant,
    shutdown_deadline: Option<(std::time::Instant, u64)>,
    migration: MigrationCtl,
    /// The memory file binding of this VM's last snapshot (taken or loaded),
    /// the only base a Diff may apply to; `None` when the dirty page log no
    /// longer counts from it (no tracking, a failed create, a migration).
    diff_base: Option<crate::persist::MemoryBinding>,
}

/// Live-migration bookkeeping of the runtime.
struct MigrationCtl {
    link: crate::live_migration::MainLink,
    rx: Receiver<crate::live_migration::MainRequest>,
    evt: Arc<EventFd>,
    pending: Arc<Mutex<bool>>,
    status: crate::migration::MigrationStatus,
    /// "Sending" or "Receiving" while one runs.
    role: Option<&'static str>,
    uri: Option<String>,
    /// The migration paused the VM (and must resume it on failure).
    paused_vm: bool,
    /// Receiver timeout from the command line.
    timeout: std::time::Duration,
    /// Token from the command line.
    token: Option<crate::migration::Token>,
    /// seccomp filters for the migration threads (`None`: `--no-seccomp`).
    filters: Option<crate::seccomp::Filters>,
}

/// How often metrics are written without being asked.
const METRICS_PERIOD: std::time::Duration = std::time::Duration::from_secs(60);

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

fn fault(msg: impl Into<String>) -> ApiResponse {
    Err(ApiFault::bad_request(msg))
}

use crate::error_chain as chain;

/// Re-points restored NICs at the TAPs `overrides` name; an unknown id is
/// refused before anything is opened.
fn apply_net_overrides(
    cfg: &mut crate::config::VmConfig,
    overrides: &[api::models::NetworkOverride],
) -> Result<(), String> {
    for o in overrides {
        let Some(n) = cfg.nets.iter_mut().find(|n| n.id == o.iface_id) else {
            let saved: Vec<&str> = cfg.nets.iter().map(|n| n.id.as_str()).collect();
            return Err(format!(
                "network_overrides: the snapshot has no network interface '{}' (it has: {})",
                o.iface_id,
                if saved.is_empty() {
                    "none".to_string()
                } else {
                    saved.join(", ")
                }
            ));
        };
        log::info!(
            "network interface {}: TAP {} instead of the saved {}",
            o.iface_id,
            o.host_dev_name,
            n.tap
        );
        n.tap.clone_from(&o.host_dev_name);
    }
    Ok(())
}

/// The kernel (and initrd) of a boot source can be opened for reading.
fn check_boot_files(b: &api::models::BootSource) -> Result<(), String> {
    let open = |what: &str, p: &str| {
        // Checked first: opening a FIFO would block the API.
        let meta = std::fs::metadata(p).map_err(|e| format!("Cannot open the {what} {p}: {e}"))?;
        if !meta.is_file() {
            return Err(format!("The {what} {p} is not a regular file"));
        }
        std::fs::File::open(p)
            .map(drop)
            .map_err(|e| format!("Cannot open the {what} {p}: {e}"))
    };
    open("kernel image", &b.kernel_image_path)?;
    if let Some(i) = &b.initrd_path {
        open("initrd", i)?;
    }
    Ok(())
}

/// A failed snapshot create: 400 if the request is at fault, else 500.
fn snapshot_fault(e: &crate::persist::SnapshotError) -> ApiResponse {
    let msg = format!("Cannot create the snapshot: {}", chain(e));
    if e.is_client_error() {
        fault(msg)
    } else {
        Err(ApiFault::internal(msg))
    }
}

impl Runtime {
    /// Starts serving (the API socket if asked) and boots at once if asked.
    pub fn new(opts: RuntimeOptions, signal_evt: &EventFd) -> Result<Self, RuntimeError> {
        let mut em = EventManager::<Subscriber>::new()
            .map_err(|e| RuntimeError::EventLoop(format!("{e:?}")))?;
        let outcome = Arc::new(Mutex::new(None));
        let api_pending = Arc::new(Mutex::new(false));
        let metrics = match &opts.metrics_path {
            Some(p) => Some(crate::metrics::MetricsSink::open(p).map_err(|source| {
                RuntimeError::Metrics {
                    path: p.clone(),
                    source,
                }
            })?),
            None => None,
        };
        let registration = match &opts.register {
            Some((name, dir)) => {
                let entry = crate::registry::Entry {
                    name: name.clone(),
                    pid: std::process::id(),
                    state: "Not started".into(),
                    vcpus: opts.preboot.machine.vcpu_count,
                    mem_mib: opts.preboot.machine.mem_size_mib as u64,
                    api_sock: opts.api_sock.clone(),
                    start_time: None,
                };
                match crate::registry::Registration::register(dir, entry) {
                    Ok(r) => Some(r),
                    Err(e) if opts.register_required => return Err(e.into()),
                    Err(e) => {
                        log::warn!("Not listed by `wisp list`: {e}");
                        None
                    }
                }
            }
            None => None,
        };
        let filters = if opts.seccomp {
            Some(
                crate::seccomp::Filters::embedded()
                    .map_err(|e| RuntimeError::Boot(e.to_string()))?,
            )
        } else {
            None
        };
        let (api, api_evt) = match &opts.api_sock {
            Some(path) => {
                let evt = EventFd::new(libc::EFD_NONBLOCK)
                    .map_err(|e| RuntimeError::EventLoop(e.to_string()))?;
                let waker_evt = evt
                    .try_clone()
                    .map_err(|e| RuntimeError::EventLoop(e.to_string()))?;
                let api_filters = filters.clone();
                let (handle, rx) = api::ApiServer::start_with_options(
                    path,
                    api::ServerOptions {
                        waker: Some(Arc::new(move || {
                            let _ = waker_evt.write(1);
                        })),
                        sandbox: Some(Arc::new(move || {
                            crate::seccomp::install(
                                api_filters.as_ref(),
                                crate::seccomp::ThreadKind::Api,
                            )
                            .map_err(|e| e.to_string())
                        })),
                        ..api::ServerOptions::default()
                    },
                )?;
                (Some((handle, rx)), Some(evt))
            }
            None => (None, None),
        };
        let mig_evt = Arc::new(
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| RuntimeError::EventLoop(e.to_string()))?,
        );
        let (link, mig_rx) = crate::live_migration::MainLink::new(mig_evt.clone());
        let migration = MigrationCtl {
            link,
            rx: mig_rx,
            evt: mig_evt,
            pending: Arc::new(Mutex::new(false)),
            status: crate::migration::MigrationStatus::new(),
            role: None,
            uri: None,
            paused_vm: false,
            timeout: opts
                .migration_timeout_s
                .map(std::time::Duration::from_secs)
                .unwrap_or(crate::migration::receiver::DEFAULT_TIMEOUT),
            token: match &opts.migration_token_file {
                Some(p) => Some(
                    crate::migration::Token::from_file(p)
                        .map_err(|e| RuntimeError::Boot(e.to_string()))?,
                ),
                None => None,
            },
            filters,
        };
        em.add_subscriber(Arc::new(Mutex::new(Wakeups {
            signal_fd: signal_evt.as_raw_fd(),
            api_fd: api_evt.as_ref().map(|e| e.as_raw_fd()),
            migration_fd: migration.evt.as_raw_fd(),
            signal: outcome.clone(),
            api_pending: api_pending.clone(),
            migration_pending: migration.pending.clone(),
        })));
        let mut rt = Self {
            em,
            outcome,
            api_pending,
            api,
            _api_evt: api_evt,
            id: opts.id,
            preboot: opts.preboot,
            vmm: None,
            paused: false,
            raw_mode: None,
            registration,
            metrics,
            last_metrics: std::time::Instant::now(),
            shutdown_deadline: None,
            migration,
            diff_base: None,
        };
        if opts.boot_now {
            rt.start_vm().map_err(RuntimeError::Boot)?;
        } else if let Some((snap, mem, resume)) = &opts.restore {
            // From the command line the VM keeps tracking dirty pages if it
            // did when it was saved, so diff snapshots go on working.
            rt.load_snapshot(snap, mem, None, *resume, &[])
                .map_err(RuntimeError::Boot)?;
        } else if let Some(uri) = &opts.incoming {
            rt.start_receive(uri, None, None)
                .map_err(RuntimeError::Boot)?;
        }
        rt.sync_registry();
        Ok(rt)
    }

    fn state(&self) -> InstanceState {
        match (&self.vmm, self.paused) {
            (None, _) => InstanceState::NotStarted,
            (Some(_), false) => InstanceState::Running,
            (Some(_), true) => InstanceState::Paused,
        }
    }

    fn sync_registry(&mut self) {
        let state = match self.state() {
            InstanceState::NotStarted => "Not started",
            InstanceState::Running => "Running",
            InstanceState::Paused => "Paused",
        };
        let size = self
            .vmm
            .as_ref()
            .map(|v| (v.config.vcpus, v.config.mem_size >> 20));
        if let Some(r) = &mut self.registration {
            if let Some((vcpus, mem)) = size {
                r.set_size(vcpus, mem);
            }
            r.set_state(state);
        }
    }

    fn start_vm(&mut self) -> Result<(), String> {
        if self.vmm.is_some() {
            return Err("The microVM is already running".into());
        }
        let cfg = self.preboot.to_vm_config().map_err(|e| e.to_string())?;
        let vmm = crate::build_vm(&cfg, false).map_err(|e| chain(&e))?;
        self.diff_base = None;
        self.adopt(vmm, &cfg)
    }

    /// Restores a snapshot into this (not yet started) VMM; `track_dirty`
    /// `None` keeps the saved machine configuration's dirty-page tracking.
    fn load_snapshot(
        &mut self,
        snapshot: &std::path::Path,
        mem: &std::path::Path,
        track_dirty: Option<bool>,
        resume: bool,
        net_overrides: &[api::models::NetworkOverride],
    ) -> Result<(), String> {
        if self.vmm.is_some() {
            return Err("A snapshot can only be loaded before the microVM starts".into());
        }
        let t0 = std::time::Instant::now();
        // The state file, and the memory file checked to be its own.
        let (mut state, binding, memory) = crate::persist::load_snapshot(
            snapshot,
            mem,
            |s: &crate::persist::snapshot::MicrovmState| &s.vm.memory,
        )
        .map_err(|e| chain(&e))?;
        // The console goes where this process says, not where the saved one did.
        state.config.serial = self.preboot.serial.clone();
        apply_net_overrides(&mut state.config, net_overrides)?;
        let track_dirty = track_dirty.unwrap_or(state.config.track_dirty_pages);
        state.config.track_dirty_pages = track_dirty;
        let cfg = state.config.clone();
        let vmm = crate::builder::restore_vm_with_memory(
            &state,
            memory,
            track_dirty,
            !resume,
            &mut crate::tap_handover::AdoptedTaps::new(),
        )
        .map_err(|e| chain(&e))?;
        self.adopt(vmm, &cfg)?;
        self.paused = !resume;
        // Dirty pages count from the loaded memory file: a Diff may apply to it.
        self.diff_base = track_dirty.then_some(binding);
        log::info!(
            "snapshot {} restored in {:.2} ms ({} MiB of memory mapped from {})",
            snapshot.display(),
            t0.elapsed().as_secs_f64() * 1e3,
            cfg.mem_size >> 20,
            mem.display()
        );
        Ok(())
    }

    fn adopt(&mut self, mut vmm: Vmm, cfg: &crate::config::VmConfig) -> Result<(), String> {
        let console = cfg.serial == SerialConfig::Stdio && stdin_is_tty();
        if console {
            self.raw_mode = RawModeGuard::new();
        }
        vmm.register_events(&mut self.em, self.outcome.clone(), console)?;
        log::info!(
            "microVM started: {} vCPUs, {} MiB, kernel {}",
            cfg.vcpus,
            cfg.mem_size >> 20,
            cfg.kernel.display()
        );
        self.vmm = Some(vmm);
        self.paused = false;
        Ok(())
    }

    /// Runs until the VM ends (or, with an API and no VM, until a signal).
    pub fn run(mut self) -> Outcome {
        let outcome = loop {
            if let Some(o) = lock(&self.outcome).take() {
                break o;
            }
            if let Some((when, secs)) = self.shutdown_deadline {
                if std::time::Instant::now() >= when {
                    break Outcome::ShutdownTimeout(secs);
                }
            }
            let timeout = if self.metrics.is_some() || self.shutdown_deadline.is_some() {
                100
            } else {
                -1
            };
            if let Err(e) = self.em.run_with_timeout(timeout) {
                break Outcome::Error(format!("Event loop failed: {e:?}"));
            }
            if self.metrics.is_some() && self.last_metrics.elapsed() >= METRICS_PERIOD {
                if let Err(e) = self.flush_metrics() {
                    log::warn!("Cannot write metrics: {e}");
                }
            }
            let pending = std::mem::take(&mut *lock(&self.api_pending));
            if pending {
                self.handle_api();
            }
            let pending = std::mem::take(&mut *lock(&self.migration.pending));
            if pending {
                self.handle_migration();
            }
        };
        log::info!("microVM ending: {outcome:?}");
        // A last metrics line, so short runs and the final counts are seen.
        if self.metrics.is_some() {
            if let Err(e) = self.flush_metrics() {
                log::warn!("Cannot write metrics: {e}");
            }
        }
        if let Some(mut vmm) = self.vmm.take() {
            vmm.stop();
        }
        self.raw_mode = None;
        if let Some((handle, _)) = self.api.take() {
            handle.shutdown();
        }
        outcome
    }

    fn handle_api(&mut self) {
        let calls: Vec<ApiCall> = match &self.api {
            Some((_, rx)) => rx.try_iter().collect(),
            None => return,
        };
        for (req, responder) in calls {
            crate::metrics::inc(&crate::metrics::API.requests);
            let answer = self.dispatch(req);
            if answer.is_err() {
                crate::metrics::inc(&crate::metrics::API.errors);
            }
            // `wisp list` shows the new state before the client hears back.
            self.sync_registry();
            responder.send(answer);
        }
    }

    fn dispatch(&mut self, req: ApiRequest) -> ApiResponse {
        let started = self.vmm.is_some();
        let preboot_only =
            |what: &str| fault(format!("{what} can only be set before the microVM starts"));
        match req {
            ApiRequest::GetInstanceInfo => api::json_response(&InstanceInfo {
                id: self.id.clone(),
                state: self.state(),
                vmm_version: env!("CARGO_PKG_VERSION").to_string(),
                app_name: "wisp".to_string(),
            }),
            ApiRequest::GetVersion => api::json_response(&VmmVersion {
                firecracker_version: env!("CARGO_PKG_VERSION").to_string(),
            }),
            ApiRequest::GetVmConfig => match &self.vmm {
                Some(v) => api::json_response(&preboot::full_config(&v.config)),
                None => match self.preboot.to_vm_config() {
                    Ok(c) => api::json_response(&preboot::full_config(&c)),
                    Err(_) => api::json_response(&api::models::FullVmConfig {
                        boot_source: self.preboot.boot_source.clone(),
                        machine_config: Some(self.preboot.machine.clone()),
                        drives: self.preboot.drives.clone(),
                        network_interfaces: self.preboot.nets.clone(),
                        ..Default::default()
                    }),
                },
            },
            ApiRequest::GetMachineConfig => match &self.vmm {
                Some(v) => api::json_response(&preboot::machine_config(&v.config)),
                None => api::json_response(&self.preboot.machine),
            },
            ApiRequest::PutBootSource(b) if !started => {
                // Opened now (as Firecracker does) so a bad path is refused here.
                if let Err(e) = check_boot_files(&b) {
                    return fault(e);
                }
                self.preboot.boot_source = Some(b);
                Ok(None)
            }
            ApiRequest::PutBootSource(_) => preboot_only("The boot source"),
            ApiRequest::PutMachineConfig(m) if !started => {
                self.preboot.machine = m;
                Ok(None)
            }
            ApiRequest::PatchMachineConfig(u) if !started => match self.preboot.machine.apply(&u) {
                Ok(m) => {
                    self.preboot.machine = m;
                    Ok(None)
                }
                Err(e) => fault(e.to_string()),
            },
            ApiRequest::PutMachineConfig(_) | ApiRequest::PatchMachineConfig(_) => {
                preboot_only("The machine configuration")
            }
            ApiRequest::PutDrive(d) if !started => {
                // Open it now (as Firecracker does) so a bad image is refused here.
                match crate::device_manager::create_block(&preboot::disk_config(&d)) {
                    Ok(_) => {
                        self.preboot.put_drive(d);
                        Ok(None)
                    }
                    Err(e) => fault(chain(&e)),
                }
            }
            ApiRequest::PutDrive(_) => preboot_only("Drives"),
            ApiRequest::PatchDrive(p) if !started => {
                match self
                    .preboot
                    .drives
                    .iter()
                    .position(|d| d.drive_id == p.drive_id)
                {
                    Some(i) => match self.preboot.drives[i].apply(&p) {
                        Ok(d) => {
                            self.preboot.drives[i] = d;
                            Ok(None)
                        }
                        Err(e) => fault(e.to_string()),
                    },
                    None => fault(format!("No drive with id '{}'", p.drive_id)),
                }
            }
            ApiRequest::PatchDrive(p) => self.patch_running_drive(p),
            ApiRequest::PutNetworkInterface(n) if !started => {
                self.preboot.put_net(n);
                Ok(None)
            }
            ApiRequest::PutNetworkInterface(_) => preboot_only("Network interfaces"),
            ApiRequest::PatchNetworkInterface(p) => fault(format!(
                "Rate limiters are not supported by wisp (interface '{}')",
                p.iface_id
            )),
            ApiRequest::Action(a) if a.action_type == ActionType::Shutdown => {
                self.shutdown(a.shutdown_timeout_s())
            }
            ApiRequest::Action(a) => self.action(a.action_type),
            ApiRequest::PutLogger(l) => {
                let update = crate::logger::LogUpdate {
                    path: l.log_path.as_deref().map(std::path::Path::new),
                    level: l.level.map(|v| v.to_filter()),
                    show_level: l.show_level,
                    show_origin: l.show_log_origin,
                    module: l.module.as_deref(),
                };
                match crate::logger::update(&update) {
                    Ok(()) => Ok(None),
                    Err(e) => fault(format!(
                        "Cannot open log file {}: {e}",
                        l.log_path.as_deref().unwrap_or_default()
                    )),
                }
            }
            ApiRequest::PutMetrics(_) if self.metrics.is_some() => {
                fault("Metrics are already configured")
            }
            ApiRequest::PutMetrics(m) => {
                match crate::metrics::MetricsSink::open(std::path::Path::new(&m.metrics_path)) {
                    Ok(sink) => {
                        self.metrics = Some(sink);
                        self.last_metrics = std::time::Instant::now();
                        Ok(None)
                    }
                    Err(e) => fault(format!("Cannot open metrics file {}: {e}", m.metrics_path)),
                }
            }
            ApiRequest::PatchVm(v) => self.patch_vm(v.state),
            ApiRequest::CreateSnapshot(p) => self.create_snapshot(p),
            ApiRequest::MigrationReceive(m) => {
                match self.start_receive(&m.uri, m.timeout_s, m.token_file.as_deref()) {
                    Ok(()) => Ok(None),
                    Err(e) => fault(e),
                }
            }
            ApiRequest::MigrationSend(m) => self.start_send(m),
            ApiRequest::GetMigrationStatus => api::json_response(&self.migration_status()),
            ApiRequest::MigrationCancel => {
                if self.migration.role.is_none() {
                    return fault("No migration is in progress");
                }
                self.migration.status.cancel();
                Ok(None)
            }
            ApiRequest::LoadSnapshot(p) => {
                let Some(mem) = p.mem_path() else {
                    return fault("mem_backend (or mem_file_path) is required");
                };
                match self.load_snapshot(
                    std::path::Path::new(&p.snapshot_path),
                    std::path::Path::new(mem),
                    Some(p.track_dirty_pages),
                    p.resume_vm,
                    &p.network_overrides,
                ) {
                    Ok(()) => Ok(None),
                    Err(e) => fault(format!("Cannot load the snapshot: {e}")),
                }
            }
        }
    }

    fn action(&mut self, action: ActionType) -> ApiResponse {
        match action {
            ActionType::InstanceStart => match self.start_vm() {
                Ok(()) => Ok(None),
                Err(e) => fault(format!("Cannot start the microVM: {e}")),
            },
            ActionType::SendCtrlAltDel => match &self.vmm {
                Some(v) => match lock(&v.i8042).trigger_ctrl_alt_del() {
                    Ok(()) => Ok(None),
                    Err(e) => fault(format!("Cannot send Ctrl-Alt-Del: {e}")),
                },
                None => fault("The microVM is not running"),
            },
            ActionType::FlushMetrics => match self.flush_metrics() {
                Ok(()) => Ok(None),
                Err(e) => fault(e),
            },
            ActionType::Stop => {
                lock(&self.outcome).get_or_insert(Outcome::Stopped);
                Ok(None)
            }
            other => fault(format!("Action {other:?} is not supported yet")),
        }
    }

    /// Swaps the backing file of a running VM's drive, keeping its format and
    /// read-only setting, and tells the guest its configuration changed.
    fn patch_running_drive(&mut self, p: api::models::PartialDrive) -> ApiResponse {
        let Some(vmm) = &mut self.vmm else {
            return fault("The microVM is not running");
        };
        if p.rate_limiter.is_some() {
            return fault("Rate limiters are not supported by wisp");
        }
        let Some(path) = p.path_on_host else {
            return Ok(None);
        };
        let Some(idx) = vmm.config.disks.iter().position(|d| d.id == p.drive_id) else {
            return fault(format!("No drive with id '{}'", p.drive_id));
        };
        let mut cfg = vmm.config.disks[idx].clone();
        cfg.path = PathBuf::from(&path);
        let new = match crate::device_manager::open_backend(&cfg) {
            Ok(d) => d,
            Err(e) => return fault(chain(&e)),
        };
        let Some(att) = vmm.disks.iter().find(|a| lock(&a.block).id() == p.drive_id) else {
            return fault(format!("No drive with id '{}'", p.drive_id));
        };
        if let Err(e) = lock(&att.block).replace_disk(cfg.path.clone(), new) {
            return fault(chain(&e));
        }
        lock(&att.transport).config_changed();
        log::info!("drive {} now backed by {}", p.drive_id, path);
        vmm.config.disks[idx] = cfg;
        Ok(None)
    }

    fn create_snapshot(&mut self, p: api::models::SnapshotCreateParams) -> ApiResponse {
        let Some(vmm) = &self.vmm else {
            return fault("The microVM is not running");
        };
        if !self.paused {
            return fault(
                "The microVM must be paused before a snapshot: PATCH /vm {\"state\": \"Paused\"}",
            );
        }
        let diff = matches!(p.snapshot_type, api::models::SnapshotType::Diff);
        let (snap, mem) = (
            std::path::Path::new(&p.snapshot_path),
            std::path::Path::new(&p.mem_file_path),
        );
        let base = self.diff_base.as_ref();
        // Refused before anything is touched: the Diff base stays valid.
        if let Err(e) = vmm.check_snapshot(diff, base, snap, mem) {
            return snapshot_fault(&e);
        }
        let result = vmm.snapshot(diff, base, snap, mem);
        // A failed create may have consumed the dirty page log: no Diff until
        // the next Full.
        self.diff_base = match &result {
            Ok((b, _)) if vmm.dirty_tracking => Some(*b),
            _ => None,
        };
        match result {
            Ok((_, st)) => {
                log::info!(
                    "{} snapshot written to {} and {}: {} bytes of memory written ({} pages, {} skipped) in {:.1} ms, {:.0} MB/s of guest memory",
                    if diff { "Diff" } else { "Full" },
                    p.snapshot_path,
                    p.mem_file_path,
                    st.bytes_written,
                    st.pages_written,
                    st.pages_skipped,
                    st.elapsed.as_secs_f64() * 1e3,
                    st.memory_mb_per_s()
                );
                Ok(None)
            }
            Err(e) => snapshot_fault(&e),
        }
    }

    /// Presses the ACPI power button and stops the VM if the guest has not
    /// powered off within `timeout_s` seconds.
    fn shutdown(&mut self, timeout_s: u64) -> ApiResponse {
        let Some(vmm) = &self.vmm else {
            return fault("The microVM is not running");
        };
        if self.paused {
            return fault("The microVM is paused: resume it before asking for a shutdown");
        }
        if let Err(e) = lock(&vmm.ged).power_button() {
            return Err(ApiFault::internal(format!(
                "Cannot press the power button: {e}"
            )));
        }
        log::info!(
            "ACPI power button pressed; stopping in {timeout_s} s unless the guest powers off"
        );
        let when = std::time::Instant::now() + std::time::Duration::from_secs(timeout_s);
        self.shutdown_deadline = Some((when, timeout_s));
        Ok(None)
    }

    fn flush_metrics(&mut self) -> Result<(), String> {
        self.last_metrics = std::time::Instant::now();
        let mut block = serde_json::Map::new();
        if let Some(v) = &self.vmm {
            for d in &v.disks {
                let b = lock(&d.block);
                block.insert(
                    b.id().to_string(),
                    serde_json::to_value(b.metrics().snapshot()).unwrap_or_default(),
                );
            }
        }
        let devices = serde_json::json!({ "block": block });
        match &mut self.metrics {
            Some(sink) => sink
                .flush(devices)
                .map_err(|e| format!("Cannot write metrics: {e}")),
            // As Firecracker: no metrics file, nothing to flush.
            None => Ok(()),
        }
    }

    fn patch_vm(&mut self, state: VmState) -> ApiResponse {
        if state == VmState::Resumed && self.paused && self.migration.paused_vm {
            // Left paused by a migration whose outcome is unknown: the
            // operator checked the receiver. Take disks and TAPs back.
            self.resume_after_migration();
            return match lock(&self.outcome).as_ref() {
                Some(Outcome::Error(e)) => Err(ApiFault::internal(e.clone())),
                _ => {
                    log::info!("microVM resumed after an unconfirmed migration");
                    Ok(None)
                }
            };
        }
        let Some(vmm) = &self.vmm else {
            return fault("The microVM is not running");
        };
        match (state, self.paused) {
            // Firecracker accepts a repeated pause or resume.
            (VmState::Paused, true) | (VmState::Resumed, false) => Ok(None),
            (VmState::Paused, false) => match vmm.pause() {
                Ok(()) => {
                    log::info!("microVM paused");
                    self.paused = true;
                    Ok(None)
                }
                Err(e) => Err(ApiFault::internal(format!("Cannot pause: {e}"))),
            },
            (VmState::Resumed, true) => match vmm.resume() {
                Ok(()) => {
                    log::info!("microVM resumed");
                    self.paused = false;
                    Ok(None)
                }
                Err(e) => Err(ApiFault::internal(format!("Cannot resume: {e}"))),
            },
        }
    }
}
