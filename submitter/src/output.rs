//! Writing results as JSON lines, and showing progress on stderr.

use std::io::Write;

use warren_broker::protocol::ResultEnvelope;

use crate::collect::ResultSink;
use crate::seqset::SeqSet;

/// Writes one JSON object per result, one per line.
pub struct JsonLines<W: Write> {
    out: std::io::BufWriter<W>,
}

impl<W: Write> JsonLines<W> {
    /// Wraps a writer.
    pub fn new(out: W) -> Self {
        Self {
            out: std::io::BufWriter::new(out),
        }
    }
}

impl<W: Write> ResultSink for JsonLines<W> {
    fn write(&mut self, result: &ResultEnvelope) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.out, result)?;
        self.out.write_all(b"\n")
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// An output file opened for a (possibly resumed) collection of `batch`: appended to, after
/// dropping a partial last line that a killed collector left, with the `seq`s of this batch's
/// results already in it so that none is written twice.
pub struct ResumedOutput {
    /// The file, positioned for appending.
    pub file: std::fs::File,
    /// Seqs of `batch` already in the file.
    pub written: SeqSet,
    /// Bytes of a partial last line that were dropped.
    pub dropped_partial: u64,
}

/// Opens (creating it if needed) `path` to append results of `batch`; see [`ResumedOutput`].
/// Reads the file once, line by line, holding only the set of seqs.
pub fn open_output(path: &std::path::Path, batch: &str) -> std::io::Result<ResumedOutput> {
    use std::io::BufRead;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)?;
    let mut reader = std::io::BufReader::new(&file);
    let mut written = SeqSet::default();
    let (mut complete, mut line) = (0u64, Vec::new());
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 || line.last() != Some(&b'\n') {
            break;
        }
        complete += n as u64;
        #[derive(serde::Deserialize)]
        struct Identity<'a> {
            #[serde(borrow)]
            batch: std::borrow::Cow<'a, str>,
            seq: Option<u32>,
        }
        if let Ok(Identity {
            batch: b,
            seq: Some(seq),
        }) = serde_json::from_slice::<Identity>(&line)
            && b == batch
        {
            written.insert(seq);
        }
    }
    let length = file.metadata()?.len();
    if length > complete {
        file.set_len(complete)?;
    }
    Ok(ResumedOutput {
        file,
        written,
        dropped_partial: length - complete,
    })
}
