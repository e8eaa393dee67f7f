//! Defaulting and validation of objects, for create and for update.
