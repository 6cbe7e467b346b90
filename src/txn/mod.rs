//! Transaction assembly (placeholder).
