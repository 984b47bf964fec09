//! Reading lines from a VMM with a size limit: a VMM (and through it a
//! guest) must never decide how much memory metald allocates. A line longer
//! than the limit is reported, not kept.

use std::io;

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// What [`read_line`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Line {
    /// A line (without its `\n`) is in the buffer. A last line the writer
    /// did not end before closing counts too.
    Complete,
    /// The line is longer than the limit. The buffer is empty; the rest of
    /// the line is still unread (see [`skip_line`]).
    TooLong,
    /// End of input, nothing read.
    Eof,
}

/// Reads one `\n`-terminated line into `buf` (cleared first), keeping at
/// most `max` bytes.
pub async fn read_line<R: AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> io::Result<Line> {
    buf.clear();
    loop {
        let chunk = r.fill_buf().await?;
        if chunk.is_empty() {
            return Ok(if buf.is_empty() {
                Line::Eof
            } else {
                Line::Complete
            });
        }
        let newline = chunk.iter().position(|&b| b == b'\n');
        let part = &chunk[..newline.unwrap_or(chunk.len())];
        if buf.len() + part.len() > max {
            buf.clear();
            return Ok(Line::TooLong);
        }
        buf.extend_from_slice(part);
        match newline {
            Some(i) => {
                r.consume(i + 1);
                return Ok(Line::Complete);
            }
            None => {
                let n = chunk.len();
                r.consume(n);
            }
        }
    }
}

/// Consumes input up to and including the next `\n` (or to the end),
/// keeping none of it. Returns how many bytes were skipped.
pub async fn skip_line<R: AsyncBufRead + Unpin>(r: &mut R) -> io::Result<u64> {
    let mut skipped = 0u64;
    loop {
        let chunk = r.fill_buf().await?;
        if chunk.is_empty() {
            return Ok(skipped);
        }
        match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => {
                r.consume(i + 1);
                return Ok(skipped + i as u64 + 1);
            }
            None => {
                let n = chunk.len();
                skipped += n as u64;
                r.consume(n);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::BufReader;

    #[tokio::test]
    async fn keeps_short_lines_and_refuses_long_ones_without_keeping_them() {
        let input = format!("short\n{}\nafter\nlast", "x".repeat(100));
        // A small read buffer, so lines span several fills.
        let mut r = BufReader::with_capacity(7, input.as_bytes());
        let mut buf = Vec::new();
        assert_eq!(
            read_line(&mut r, &mut buf, 10).await.unwrap(),
            Line::Complete
        );
        assert_eq!(buf, b"short");
        assert_eq!(
            read_line(&mut r, &mut buf, 10).await.unwrap(),
            Line::TooLong
        );
        assert!(buf.is_empty());
        assert!(skip_line(&mut r).await.unwrap() > 0);
        assert_eq!(
            read_line(&mut r, &mut buf, 10).await.unwrap(),
            Line::Complete
        );
        assert_eq!(buf, b"after");
        assert_eq!(
            read_line(&mut r, &mut buf, 10).await.unwrap(),
            Line::Complete
        );
        assert_eq!(buf, b"last");
        assert_eq!(read_line(&mut r, &mut buf, 10).await.unwrap(), Line::Eof);
    }

    #[tokio::test]
    async fn a_line_of_exactly_the_limit_is_kept() {
        let mut r = BufReader::new(&b"0123456789\n"[..]);
        let mut buf = Vec::new();
        assert_eq!(
            read_line(&mut r, &mut buf, 10).await.unwrap(),
            Line::Complete
        );
        assert_eq!(buf, b"0123456789");
    }
}
