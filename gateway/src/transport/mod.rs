//! QUIC transport
