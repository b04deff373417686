//! echo (in progress)
