//! SQL classification (being written).
