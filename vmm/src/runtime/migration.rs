// SPDX-License-Identifier: Apache-2.0
//! The runtime's side of live migration: starting a sender or receiver thread,
//! answering its requests on the main thread (pause and save, resume,
//! restore), and reporting status.

use std::time::Duration;

use api::models::ApiFault;
use api::ApiResponse;
use devices::bus::lock;

use super::{chain, fault, Runtime};
use crate::live_migration::{self, MainRequest, Source, Target};
use crate::migration::{self, MigrationUri, ReceiveOptions, SendOptions};
use crate::vmm::Outcome;

/// Longest the main thread waits for the sender's outcome once it has handed
/// over the VM's state (the sender has its own, shorter, timeouts).
const FINAL_PHASE_LIMIT: Duration = Duration::from_secs(180);

impl Runtime {
    /// Listens on `uri` and receives a migration on a thread; the VM starts
    /// when the state arrives. `timeout_s` and `token_file` override the
    /// command line's `--migration-timeout` and `--migration-token-file`.
    pub(super) fn start_receive(
        &mut self,
        uri: &str,
        timeout_s: Option<u64>,
        token_file: Option<&str>,
    ) -> Result<(), String> {
        if self.vmm.is_some() {
            return Err("A migration can only be received before the microVM starts".into());
        }
        if self.migration.role.is_some() {
            return Err("A migration is already in progress".into());
        }
        let parsed: MigrationUri = uri.parse().map_err(|e| chain(&e))?;
        let opts = ReceiveOptions {
            token: self.migration_token(token_file)?,
            ..ReceiveOptions::with_timeout(
                timeout_s
                    .map(Duration::from_secs)
                    .unwrap_or(self.migration.timeout),
            )
        };
        let cfg = self.preboot.to_vm_config_for_incoming();
        let kvm_cpuid = host_cpuid()?;
        let memory =
            crate::vstate::memory::create_guest_memory(cfg.mem_size).map_err(|e| chain(&e))?;
        let listener = migration::listen(&parsed).map_err(|e| chain(&e))?;
        let target = Target {
            config: live_migration::migration_config(&cfg, &kvm_cpuid),
            host: live_migration::host_features(&kvm_cpuid),
            memory,
            link: self.migration.link.clone(),
        };
        live_migration::spawn_receiver(listener, target, opts, self.migration.filters.clone())
            .map_err(|e| format!("Cannot start the migration thread: {e}"))?;
        self.migration.status = migration::MigrationStatus::new();
        self.migration.role = Some("Receiving");
        self.migration.uri = Some(uri.to_string());
        log::info!("waiting for an incoming migration on {uri}");
        Ok(())
    }

    /// Starts sending the running VM to `m.uri`.
    pub(super) fn start_send(&mut self, m: api::models::MigrationSend) -> ApiResponse {
        let Some(vmm) = &self.vmm else {
            return fault("The microVM is not running");
        };
        if self.migration.role.is_some() {
            return fault("A migration is already in progress");
        }
        let uri: MigrationUri = match m.uri.parse() {
            Ok(u) => u,
            Err(e) => return fault(chain(&e)),
        };
        let mut opts = SendOptions::default();
        if let Some(ms) = m.max_downtime_ms {
            opts.max_downtime = Duration::from_millis(ms);
        }
        opts.auto_converge = m.auto_converge.unwrap_or(false);
        opts.token = match self.migration_token(m.token_file.as_deref()) {
            Ok(t) => t,
            Err(e) => return fault(e),
        };
        let source = Source {
            config: live_migration::migration_config(&vmm.config, &vmm.host_cpuid),
            memory: vmm.vm.memory.clone(),
            vm_fd: vmm.vm.fd.clone(),
            tracking_before: vmm.dirty_tracking,
            link: self.migration.link.clone(),
        };
        let status = migration::MigrationStatus::new();
        if let Err(e) = live_migration::spawn_sender(
            uri,
            source,
            opts,
            status.clone(),
            m.max_bandwidth_mib_s,
            self.migration.filters.clone(),
        ) {
            return Err(ApiFault::internal(format!(
                "Cannot start the migration thread: {e}"
            )));
        }
        self.migration.status = status;
        // The sender reads and clears the dirty page log: a later Diff
        // snapshot could not count from the last snapshot any more.
        self.diff_base = None;
        self.migration.role = Some("Sending");
        self.migration.uri = Some(m.uri.clone());
        log::info!("migrating to {}", m.uri);
        Ok(None)
    }

    /// The token in `file` if given, else the command line's, if any.
    fn migration_token(&self, file: Option<&str>) -> Result<Option<migration::Token>, String> {
        match file {
            Some(f) => migration::Token::from_file(std::path::Path::new(f))
                .map(Some)
                .map_err(|e| e.to_string()),
            None => Ok(self.migration.token.clone()),
        }
    }

    /// `GET /migration`: the API's status fields plus wisp's progress details.
    pub(super) fn migration_status(&self) -> serde_json::Value {
        let s = self.migration.status.snapshot();
        let state = match (self.migration.role, s.state) {
            (_, migration::MigrationState::Completed) => "Completed",
            (_, migration::MigrationState::Failed) => "Failed",
            (_, migration::MigrationState::Cancelled) => "Cancelled",
            (Some(r), _) => r,
            (None, _) => "None",
        };
        let total = self.vmm.as_ref().map(|v| v.config.mem_size).unwrap_or(0);
        serde_json::json!({
            "state": state,
            "uri": self.migration.uri,
            "transferred_bytes": s.bytes_sent,
            "total_bytes": total,
            "iteration": s.iteration,
            "remaining_dirty_pages": s.dirty_pages,
            "downtime_ms": s.downtime_ms,
            "error": s.error,
            "phase": format!("{:?}", s.state),
            "pages_sent": s.pages_sent,
            "zero_pages": s.zero_pages,
            "dirty_pages_per_s": s.dirty_pages_per_s,
            "dirty_mib_per_s": s.dirty_mib_per_s,
            "bandwidth_mib_per_s": s.bandwidth_mib_per_s,
            "expected_downtime_ms": s.expected_downtime_ms,
        })
    }

    pub(super) fn handle_migration(&mut self) {
        while let Ok(req) = self.migration.rx.try_recv() {
            self.on_migration_request(req);
        }
    }

    fn on_migration_request(&mut self, req: MainRequest) {
        match req {
            MainRequest::PauseAndSave(reply) => {
                let saved = self.pause_and_save();
                let ok = saved.is_ok();
                let _ = reply.send(saved);
                if ok {
                    self.await_final_phase();
                }
            }
            MainRequest::Resume(reply) => {
                self.resume_after_migration();
                let _ = reply.send(());
            }
            MainRequest::SenderDone(result) => self.sender_done(result),
            MainRequest::Throttle(p) => {
                if let Some(vmm) = &mut self.vmm {
                    vmm.set_throttle(p);
                }
            }
            MainRequest::Restore(state, memory, reply) => {
                let r = self.restore_incoming(&state, memory);
                let _ = reply.send(r);
            }
            MainRequest::Run(reply) => {
                let r = self.run_incoming();
                let _ = reply.send(r);
            }
            MainRequest::ReceiverDone(result) => {
                self.migration.role = None;
                match result {
                    Ok(r) => log::info!(
                        "migration received: {} pages in {:.1} ms",
                        r.pages,
                        r.total.as_secs_f64() * 1e3
                    ),
                    Err(e) => {
                        // The guest never ran here: leave the disks and TAPs
                        // to the source, and stop.
                        if let Some(vmm) = &mut self.vmm {
                            if let Err(e) = vmm.hand_over_host_resources() {
                                log::warn!("{e}");
                            }
                        }
                        lock(&self.outcome).get_or_insert(Outcome::Error(format!(
                            "Incoming migration failed: {e}"
                        )));
                    }
                }
            }
        }
    }

    fn pause_and_save(&mut self) -> Result<Vec<u8>, String> {
        let vmm = self.vmm.as_mut().ok_or("The microVM is not running")?;
        if !self.paused {
            vmm.pause().map_err(|e| e.to_string())?;
            self.migration.paused_vm = true;
            self.paused = true;
        }
        vmm.flush_disks()?;
        let migrated = live_migration::MigratedVm {
            state: vmm.save_state()?,
            taps: vmm.tap_offer(),
        };
        // The receiver (possibly on this host) opens the same images and
        // takes the TAPs over (bridge ports and all); all are taken back if
        // the migration fails.
        vmm.hand_over_host_resources()?;
        crate::persist::format::encode_state_as(&migrated, crate::persist::format::STREAM_VERSION)
            .map_err(|e| e.to_string())
    }

    /// After handing over the state, waits (not serving devices, so nothing
    /// changes the saved VM) for the sender to finish or to ask for a resume.
    fn await_final_phase(&mut self) {
        loop {
            match self.migration.rx.recv_timeout(FINAL_PHASE_LIMIT) {
                Ok(MainRequest::Resume(reply)) => {
                    self.resume_after_migration();
                    let _ = reply.send(());
                    return;
                }
                Ok(MainRequest::SenderDone(result)) => {
                    // In doubt, the receiver may run the guest: stay paused.
                    let resume = matches!(&result, Err(e) if !matches!(e, migration::MigrationError::InDoubt(_)));
                    self.sender_done(result);
                    if resume {
                        self.resume_after_migration();
                    }
                    return;
                }
                Ok(other) => self.on_migration_request(other),
                Err(_) => {
                    log::error!("migration sender did not finish; resuming the VM");
                    self.resume_after_migration();
                    return;
                }
            }
        }
    }

    /// Runs the VM again after a failed migration, with its disks and TAPs.
    pub(super) fn resume_after_migration(&mut self) {
        if !self.migration.paused_vm {
            return;
        }
        self.migration.paused_vm = false;
        if let Some(vmm) = &mut self.vmm {
            vmm.hand_over_nets(false);
            if let Err(e) = relock_disks(vmm) {
                // Someone else writes the images now: never two writers.
                lock(&self.outcome).get_or_insert(Outcome::Error(e));
                return;
            }
            match vmm.resume() {
                Ok(()) => self.paused = false,
                Err(e) => {
                    lock(&self.outcome).get_or_insert(Outcome::Error(format!(
                        "Cannot resume the VM after a failed migration: {e}"
                    )));
                }
            }
        }
    }

    fn sender_done(&mut self, result: Result<migration::SendReport, migration::MigrationError>) {
        self.migration.role = None;
        match result {
            Ok(r) => {
                log::info!(
                    "migrated to {}: {} bytes in {:.1} ms, downtime {:.1} ms",
                    self.migration.uri.as_deref().unwrap_or("?"),
                    r.bytes_sent,
                    r.total.as_secs_f64() * 1e3,
                    r.downtime.as_secs_f64() * 1e3
                );
                lock(&self.outcome).get_or_insert(Outcome::Migrated(
                    self.migration.uri.clone().unwrap_or_default(),
                ));
            }
            Err(e @ migration::MigrationError::InDoubt(_)) => log::error!("{e}"),
            Err(e) => log::warn!("migration failed, the VM keeps running: {e}"),
        }
    }

    fn restore_incoming(
        &mut self,
        state: &[u8],
        memory: devices::GuestMemoryMmap,
    ) -> Result<(), String> {
        let migrated: live_migration::MigratedVm = crate::persist::format::decode_state_with(
            state,
            std::path::Path::new("migration stream"),
            crate::persist::format::STREAM_SUPPORTED_VERSIONS,
        )
        .map_err(|e| chain(&e))?;
        let mut state = migrated.state;
        state.config.serial = self.preboot.serial.clone();
        let cfg = state.config.clone();
        let mut taps = migrated.taps.take()?;
        let vmm = crate::builder::restore_vm_with_memory(&state, memory, false, true, &mut taps)
            .map_err(|e| chain(&e))?;
        self.adopt(vmm, &cfg)?;
        // Paused until the source commits (`Go`).
        self.paused = true;
        Ok(())
    }

    /// Runs the guest restored by [`Self::restore_incoming`]: the source has
    /// committed, so its TAPs' bridge ports are this VMM's now.
    fn run_incoming(&mut self) -> Result<(), String> {
        let vmm = self.vmm.as_mut().ok_or("No VM was restored")?;
        vmm.resume()
            .map_err(|e| format!("Cannot start the vCPUs: {e}"))?;
        vmm.hand_over_nets(false);
        self.paused = false;
        Ok(())
    }
}

/// Takes the disk locks back, waiting a little for a receiver that is giving
/// them up after its own failure.
fn relock_disks(vmm: &crate::vmm::Vmm) -> Result<(), String> {
    for d in &vmm.disks {
        let mut b = lock(&d.block);
        let mut tries = 0;
        while let Err(e) = b.reacquire_lock() {
            tries += 1;
            if tries > 40 {
                return Err(format!(
                    "After a failed migration, disk '{}' is locked by another process ({e}); stopping this VM so two VMs never write it",
                    b.id()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

fn host_cpuid() -> Result<Vec<kvm_bindings::kvm_cpuid_entry2>, String> {
    let kvm = crate::vstate::vm::open_kvm().map_err(|e| chain(&e))?;
    let c = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| format!("KVM_GET_SUPPORTED_CPUID failed: {e}"))?;
    Ok(c.as_slice().to_vec())
}
