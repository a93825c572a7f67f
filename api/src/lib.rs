// SPDX-License-Identifier: Apache-2.0
//! wisp's API: request/response models, the Unix-socket HTTP server and the client.
