// SPDX-License-Identifier: Apache-2.0
//! wisp's API: request/response models, the Unix-socket HTTP server and the client.
//!
//! The wire format follows Firecracker's REST API; wisp extensions are marked in
//! `api/openapi/wisp.yaml` with `x-wisp-extension: true`.

pub mod client;
pub mod models;
pub mod request;
pub mod routes;
pub mod server;

pub use client::{Client, ClientError, Connection};
pub use models::ApiFault;
pub use request::{json_response, ApiRequest, ApiResponse};
pub use routes::{route, MAX_BODY_LEN};
pub use server::{ApiCall, ApiError, ApiServer, ApiServerHandle, ResponseSender, Waker};
