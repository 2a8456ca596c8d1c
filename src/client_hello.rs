//! TEMPORARY placeholder with the agreed API; replaced by the real parser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peek {
    Incomplete,
    Done(Option<String>),
}
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("not a TLS handshake")]
    NotTls,
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    #[error("ClientHello larger than the limit")]
    TooLarge,
}
pub fn server_name(_buf: &[u8], _max_len: usize) -> Result<Peek, Error> {
    Err(Error::NotTls)
}
