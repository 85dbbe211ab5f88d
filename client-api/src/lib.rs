//! Hearth's client protocol, as a Rust crate.
//!
//! A Hearth node serves its users over two surfaces: a stateless HTTP JSON API
//! (`/v1/...`: accounts, devices, channels, history, presence) and one WebSocket
//! session per device (`/v1/ws`: sending, live events, sync, presence updates).
//! This crate holds the wire types of both, so server and clients share one
//! definition, and the async client library built on them.
//!
//! # Layout
//! - [`model`]: the chat domain as clients see it (events, channels, presence).
//! - [`http`]: request and response bodies of the HTTP API, and the error document.
//! - [`frames`]: WebSocket frames in both directions.
//! - [`ErrorCode`] and [`close`]: stable error codes and WebSocket close codes.
//! - `client`: the async client library: [`Client`] / [`AuthedClient`] for the HTTP
//!   API, [`connect_session`] and [`Connection`] for the WebSocket session.
//! - [`chat`]: the line-based terminal chat client behind the `hearth-chat` binary.
//!
//! `docs/protocol.md` describes the same protocol in prose, for clients in other
//! languages.

pub mod chat;
mod client;
mod error_code;
pub mod frames;
pub mod http;
pub mod model;

pub use client::{
    ABNORMAL_CLOSE, AuthedClient, Client, ClientError, Connection, KeyGen, Ready, SessionReceiver,
    SessionSender, Target, WsStream, connect_session, ws_url,
};
pub use error_code::{ErrorCode, close};
pub use frames::{ClientFrame, PROTOCOL_VERSION, ServerFrame};
