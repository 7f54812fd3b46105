//! stub
pub struct Vsock;
pub struct VsockBackend;
