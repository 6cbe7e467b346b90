//! LSN progress tracking (placeholder).
