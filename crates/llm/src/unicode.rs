//! The character classes of the pre-tokenizer regexes: `\p{L}`, `\p{N}`, `\p{P}` and `\s`.

use crate::unicode_tables::{LETTER, NUMBER, PUNCTUATION};

fn in_ranges(ranges: &[(u32, u32)], c: char) -> bool {
    let c = c as u32;
    // The last range starting at or before `c`.
    let i = ranges.partition_point(|&(lo, _)| lo <= c);
    i > 0 && ranges.get(i - 1).is_some_and(|&(_, hi)| c <= hi)
}

/// `\p{L}`: general category L (Lu, Ll, Lt, Lm, Lo).
pub(crate) fn is_letter(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_alphabetic();
    }
    in_ranges(LETTER, c)
}

/// `\p{N}`: general category N (Nd, Nl, No).
pub(crate) fn is_number(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_digit();
    }
    in_ranges(NUMBER, c)
}

/// `\p{P}`: general category P (Pc, Pd, Ps, Pe, Pi, Pf, Po).
pub(crate) fn is_punctuation(c: char) -> bool {
    if c.is_ascii() {
        // ASCII punctuation but the symbols (`$+<=>^`|~`: Sc, Sm, Sk).
        return c.is_ascii_punctuation() && !"$+<=>^`|~".contains(c);
    }
    in_ranges(PUNCTUATION, c)
}

/// `\s`: the Unicode `White_Space` property (what llama.cpp's tables use).
pub(crate) fn is_space(c: char) -> bool {
    matches!(
        c,
        '\u{9}'..='\u{D}'
            | ' '
            | '\u{85}'
            | '\u{A0}'
            | '\u{1680}'
            | '\u{2000}'..='\u{200A}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{202F}'
            | '\u{205F}'
            | '\u{3000}'
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        for c in ['a', 'Z', 'é', 'ß', 'Ω', 'ж', '中', 'ー', 'ǅ'] {
            assert!(is_letter(c), "{c}");
            assert!(!is_number(c), "{c}");
        }
        for c in ['0', '9', '٣', '½', 'Ⅻ', '²', '𝟘'] {
            assert!(is_number(c), "{c}");
            assert!(!is_letter(c), "{c}");
        }
        for c in [
            ' ',
            '!',
            '\'',
            '\n',
            '€',
            '😀',
            '\u{0}',
            '\u{10FFFF}',
            '\u{E000}',
        ] {
            assert!(!is_letter(c) && !is_number(c), "{c:?}");
        }
        assert!(is_space('\u{3000}') && is_space('\n') && !is_space('\u{200B}'));
        // Every range is well formed and the tables are sorted and disjoint.
        for t in [crate::unicode_tables::LETTER, crate::unicode_tables::NUMBER] {
            for w in t.windows(2) {
                assert!(w[0].0 <= w[0].1 && w[0].1 < w[1].0);
            }
        }
    }
}
