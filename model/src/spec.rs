//! Errors in the files users write (rules, studies): each names the file,
//! the line and column, and the field, so the user can go straight to it.

use std::ops::Range;
use std::path::{Path, PathBuf};

/// Why a definition file was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct SpecError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    /// What is wrong, starting with the item and field it concerns.
    pub message: String,
}

impl SpecError {
    /// An error at byte `span` of `text` (the file's contents).
    pub fn at(file: &Path, text: &str, span: Range<usize>, message: String) -> SpecError {
        let upto = &text[..floor_char_boundary(text, span.start)];
        let line = upto.matches('\n').count() + 1;
        let column = upto.len() - upto.rfind('\n').map_or(0, |i| i + 1) + 1;
        SpecError {
            file: file.to_path_buf(),
            line,
            column,
            message,
        }
    }

    /// An error about the file as a whole (it cannot be read, an id clash).
    pub fn whole(file: &Path, message: String) -> SpecError {
        SpecError {
            file: file.to_path_buf(),
            line: 0,
            column: 0,
            message,
        }
    }
}

fn floor_char_boundary(text: &str, mut i: usize) -> usize {
    i = i.min(text.len());
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}
