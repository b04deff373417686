//! Placeholder: the model-based tests of `Connection` land here.
