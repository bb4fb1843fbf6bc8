//! The operator API served by `musubi-controller`.

pub mod operator;
