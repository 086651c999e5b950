//! PostgreSQL wire framing (being written).
