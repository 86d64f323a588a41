//! Reading HTTP/1.1 responses off a raw socket, for the load tools (`train`, the e2e bench):
//! small `Content-Length` bodies, no chunked framing, no pipelining.

use std::io;

/// Status, end of the head and `Content-Length` of the response at the start of `buf`, once
/// its head is complete; `None` before. A response without `Content-Length` is an error: these
/// tools could not tell where its body ends.
pub fn response_head(buf: &[u8]) -> io::Result<Option<(u16, usize, usize)>> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head_end = end + 4;
    let head = std::str::from_utf8(&buf[..head_end]).map_err(io::Error::other)?;
    let status = head
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line: {head:?}")))?;
    let length = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .ok_or_else(|| io::Error::other(format!("no Content-Length: {head:?}")))?;
    Ok(Some((status, head_end, length)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_is_read_once_complete_and_needs_a_content_length() {
        let response = b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(response_head(&response[..20]).unwrap(), None);
        assert_eq!(response_head(response).unwrap(), Some((201, 43, 2)));
        assert!(response_head(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
        assert!(response_head(b"HTTP/1.1 2x0 OK\r\ncontent-length: 0\r\n\r\n").is_err());
    }
}
