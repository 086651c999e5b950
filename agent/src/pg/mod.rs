//! PostgreSQL: wire protocol framing (`wire`) and statement classification with the real
//! PostgreSQL parser (`classify`).

pub mod classify;
pub mod wire;
