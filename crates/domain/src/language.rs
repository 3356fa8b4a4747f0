//! One descriptor per language: what the manifest, the CLI and the server know about a
//! language (file extensions, the handler's syntax and default, whether a block's source
//! may be a directory), read from one table instead of `match` arms spread over the crates.
//!
//! Adding a language means adding a [`Language`] variant and its entry in [`DESCRIPTORS`];
//! what starts its instances (the shim, zygote and standby support) is the runtimes
//! crate's `entry`, keyed by the same language.

use crate::Language;

/// What the platform's manifest side knows about one language.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LanguageDescriptor {
    pub language: Language,
    /// Its name in `language = "..."`.
    pub name: &'static str,
    /// Extension of the file an inline `code = "..."` block is stored as.
    pub inline_extension: &'static str,
    /// How `handler` is written, for messages; `None`: the language takes no handler (its
    /// one file is the program).
    pub handler_syntax: Option<&'static str>,
    /// The handler a directory source uses when the manifest names none.
    pub default_handler: &'static str,
    /// Extensions tried, in order, for the file a handler names (unless it names one).
    pub handler_extensions: &'static [&'static str],
    /// Whether the handler's module part is dotted (`pkg.app` → `pkg/app.py`) rather than a
    /// path (`lib/app` → `lib/app.js`).
    pub dotted_modules: bool,
    /// Whether the function name may hold `$` (a JavaScript identifier).
    pub dollar_in_identifiers: bool,
    /// Whether `source` may name a directory.
    pub directory_sources: bool,
}

/// Every language's descriptor, in [`Language::ALL`] order.
pub const DESCRIPTORS: [LanguageDescriptor; 3] = [
    LanguageDescriptor {
        language: Language::Python,
        name: "python",
        inline_extension: "py",
        handler_syntax: Some("`module.function`, e.g. `main.main` or `pkg.app.handle`"),
        default_handler: "main.main",
        handler_extensions: &["py"],
        dotted_modules: true,
        dollar_in_identifiers: false,
        directory_sources: true,
    },
    LanguageDescriptor {
        language: Language::Node,
        name: "node",
        inline_extension: "js",
        handler_syntax: Some("`file.function`, e.g. `index.main` or `lib/app.handle`"),
        default_handler: "index.main",
        handler_extensions: &["js", "mjs", "cjs"],
        dotted_modules: false,
        dollar_in_identifiers: true,
        directory_sources: true,
    },
    LanguageDescriptor {
        language: Language::Shell,
        name: "shell",
        inline_extension: "sh",
        handler_syntax: None,
        default_handler: "main.main",
        handler_extensions: &["sh"],
        dotted_modules: false,
        dollar_in_identifiers: false,
        directory_sources: false,
    },
];

impl Language {
    /// This language's descriptor.
    pub fn descriptor(self) -> &'static LanguageDescriptor {
        // DESCRIPTORS is in `Language::ALL` order (checked by a test); the fallback is
        // unreachable.
        DESCRIPTORS
            .iter()
            .find(|d| d.language == self)
            .unwrap_or(&DESCRIPTORS[0])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_language_has_one_descriptor_in_order() {
        for (language, descriptor) in Language::ALL.iter().zip(DESCRIPTORS.iter()) {
            assert_eq!(*language, descriptor.language);
            assert_eq!(language.descriptor().name, language.as_str());
        }
        assert_eq!(Language::ALL.len(), DESCRIPTORS.len());
    }
}
