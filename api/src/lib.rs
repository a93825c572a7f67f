// SPDX-License-Identifier: Apache-2.0
//! wisp's API: request/response models, the Unix-socket HTTP server and the client.
//!
//! The wire format follows Firecracker's REST API; wisp extensions are marked in
//! `api/openapi/wisp.yaml` with `x-wisp-extension: true`.
//!
//! # How the VMM uses it
//!
//! [`ApiServer::start_with_waker`] binds the socket (mode 0600) and serves it on
//! its own thread. Each well-formed request is routed and validated there
//! ([`route`]), and only then sent to the VMM as an [`ApiCall`]: the parsed
//! [`ApiRequest`] and a [`ResponseSender`] for the answer. The waker is called
//! after each send, so the VMM's event loop can sleep on an eventfd:
//!
//! ```no_run
//! use std::sync::Arc;
//! use api::{ApiRequest, ApiServer};
//!
//! let (server, requests) = ApiServer::start_with_waker(
//!     "/tmp/wisp.sock",
//!     Some(Arc::new(|| { /* e.g. event_fd.write(1) */ })),
//! )?;
//! // In the event loop, when the eventfd fires:
//! while let Ok((request, responder)) = requests.try_recv() {
//!     let answer = match request {
//!         ApiRequest::GetInstanceInfo => api::json_response(&serde_json::json!({})),
//!         _ => Err(api::ApiFault::bad_request("not implemented")),
//!     };
//!     responder.send(answer); // Ok(None) -> 204, Ok(Some(json)) -> 200, Err -> fault
//! }
//! server.shutdown(); // also on drop; removes the socket file
//! # Ok::<(), api::ApiError>(())
//! ```

pub mod client;
pub mod models;
pub mod request;
pub mod routes;
pub mod server;
pub mod socket;

pub use client::{Client, ClientError, Connection};
pub use models::ApiFault;
pub use request::{json_response, ApiRequest, ApiResponse};
pub use routes::{route, MAX_BODY_LEN};
pub use server::{
    ApiCall, ApiError, ApiServer, ApiServerHandle, ResponseSender, Sandbox, ServerOptions, Waker,
};
