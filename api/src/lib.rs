//! Ferro API.
