// SPDX-License-Identifier: Apache-2.0
//! What the VMM is asked to do, and what it answers.

use crate::models::{
    ApiFault, BootSource, Drive, InstanceActionInfo, Logger, MachineConfig, MachineConfigUpdate,
    Metrics, MigrationReceive, MigrationSend, NetworkInterface, PartialDrive,
    PartialNetworkInterface, SnapshotCreateParams, SnapshotLoadParams, Vm,
};

/// One parsed and validated API request for the VMM to execute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRequest {
    /// `GET /`: answer with an [`crate::models::InstanceInfo`].
    GetInstanceInfo,
    /// `GET /version`: answer with a [`crate::models::VmmVersion`].
    GetVersion,
    /// `GET /vm/config`: answer with a [`crate::models::FullVmConfig`].
    GetVmConfig,
    /// `GET /machine-config`: answer with a [`MachineConfig`].
    GetMachineConfig,
    /// `PUT /boot-source`.
    PutBootSource(BootSource),
    /// `PUT /machine-config`.
    PutMachineConfig(MachineConfig),
    /// `PATCH /machine-config`.
    PatchMachineConfig(MachineConfigUpdate),
    /// `PUT /drives/{id}`: insert or replace (pre-boot).
    PutDrive(Drive),
    /// `PATCH /drives/{id}`: swap backing file or rate limits.
    PatchDrive(PartialDrive),
    /// `PUT /network-interfaces/{id}`.
    PutNetworkInterface(NetworkInterface),
    /// `PATCH /network-interfaces/{id}`: change rate limits.
    PatchNetworkInterface(PartialNetworkInterface),
    /// `PUT /actions`.
    Action(InstanceActionInfo),
    /// `PATCH /vm`: pause or resume.
    PatchVm(Vm),
    /// `PUT /logger`.
    PutLogger(Logger),
    /// `PUT /metrics`.
    PutMetrics(Metrics),
    /// `PUT /snapshot/create`.
    CreateSnapshot(SnapshotCreateParams),
    /// `PUT /snapshot/load`.
    LoadSnapshot(SnapshotLoadParams),
    /// `PUT /migration/receive` (wisp extension).
    MigrationReceive(MigrationReceive),
    /// `PUT /migration/send` (wisp extension).
    MigrationSend(MigrationSend),
    /// `GET /migration` (wisp extension): answer with a [`crate::models::MigrationStatus`].
    GetMigrationStatus,
    /// `PUT /migration/cancel` (wisp extension).
    MigrationCancel,
}

/// The VMM's answer: `Ok(None)` is 204, `Ok(Some(json))` is 200 with that body,
/// `Err(fault)` is `fault.status` with `{"fault_message": ...}`.
pub type ApiResponse = Result<Option<serde_json::Value>, ApiFault>;

/// Turns a serialisable answer into a 200 response.
pub fn json_response<T: serde::Serialize>(value: &T) -> ApiResponse {
    serde_json::to_value(value)
        .map(Some)
        .map_err(|e| ApiFault::internal(format!("cannot serialise the answer: {e}")))
}
