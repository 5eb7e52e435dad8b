//! The streaming pass that computes dashboards.
