//! TEMPORARY placeholder with the agreed API; replaced by the real parser.
use std::net::SocketAddr;
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub source: Option<SocketAddr>,
    pub destination: Option<SocketAddr>,
    pub version: Version,
}
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    Incomplete,
    Done { header: Header, consumed: usize },
}
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("not a PROXY protocol header")]
    NotProxy,
    #[error("malformed PROXY header: {0}")]
    Malformed(&'static str),
    #[error("PROXY header longer than the limit")]
    TooLong,
}
pub const V1_MAX: usize = 107;
pub fn parse(_buf: &[u8], _max_len: usize) -> Result<Parsed, Error> {
    Err(Error::NotProxy)
}
pub fn encode(
    _version: Version,
    _source: SocketAddr,
    _destination: SocketAddr,
    _out: &mut Vec<u8>,
) {
}
pub fn encode_local(_version: Version, _out: &mut Vec<u8>) {}
