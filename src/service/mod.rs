//! What ebb offers the machines around it, beside the control socket: Prometheus metrics and
//! a health check over HTTP ([`http`]), and systemd's readiness, status and watchdog
//! notifications ([`notify`]).
//!
//! Both are optional and neither can hold up the process they serve: the HTTP server runs on
//! threads of its own and reads the figures through a callback; a notification is one
//! non-blocking datagram.

pub mod http;
pub mod notify;
pub mod vm;
