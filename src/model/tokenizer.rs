//! Tokenizers: byte-level BPE (GPT-2 style, `tokenizer.ggml.model = gpt2`) and SentencePiece
//! (`tokenizer.ggml.model = llama`) rebuilt from GGUF metadata, or the Hugging Face layout
//! (`tokenizer.json` + `tokenizer_config.json`).
//!
//! llama.cpp is the reference: a GGUF tokenizer here splits text, merges and falls back to bytes
//! as llama.cpp does at commit 0c1e5709 (`src/llama-vocab.cpp`), so that prompts become the same
//! ids and a greedy run can be compared token for token.
//!
//! - Encoding goes through the `tokenizers` crate. For `gpt2` the pre-tokenizer is llama.cpp's
//!   list of regexes for `tokenizer.ggml.pre`, each applied to the pieces the previous one left
//!   (`Split`, isolated), then the GPT-2 byte-to-unicode mapping. For `llama` the BPE merges are
//!   derived from the vocabulary and scores as Hugging Face's SentencePiece converter does, which
//!   reproduces SentencePiece's "merge the adjacent pair whose union has the best score" loop.
//! - Tokens of type unknown (2), control (3) and user-defined (4) are added tokens: their text in
//!   the input is matched before anything else and becomes that token.
//! - Decoding is done here, token by token as llama.cpp's `token_to_piece` does, so that ids
//!   outside the vocabulary are an error and special tokens render as their text.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::format::gguf::Value;
use crate::model::chat::{apply_chat_template, template_or_default, ChatMessage, CHATML_TEMPLATE};

/// SentencePiece's whitespace marker, U+2581.
const SPM_SPACE: char = '\u{2581}';

/// Largest vocabulary accepted: token ids are `u32` and every id must be representable.
const MAX_N_VOCAB: usize = u32::MAX as usize;

/// A token's type, numbered as GGUF and SentencePiece number them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenType {
    Undefined,
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    /// GGUF's `tokenizer.ggml.token_type` code; an unknown code is `Undefined`, as in llama.cpp.
    pub fn from_code(code: i64) -> TokenType {
        match code {
            1 => TokenType::Normal,
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Undefined,
        }
    }

    pub fn code(self) -> i32 {
        match self {
            TokenType::Undefined => 0,
            TokenType::Normal => 1,
            TokenType::Unknown => 2,
            TokenType::Control => 3,
            TokenType::UserDefined => 4,
            TokenType::Unused => 5,
            TokenType::Byte => 6,
        }
    }

    /// Matched in the input text before pre-tokenization (llama.cpp's special-token cache).
    fn is_added(self) -> bool {
        matches!(
            self,
            TokenType::Unknown | TokenType::Control | TokenType::UserDefined
        )
    }
}

/// How ids turn back into bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pieces {
    /// Normal tokens are strings of GPT-2's byte-to-unicode characters.
    ByteLevel,
    /// `▁` is a space, `<0xNN>` tokens are bytes; the first piece loses one leading space when
    /// the encoder adds one (`add_space_prefix`).
    SentencePiece { strip_leading_space: bool },
    /// Whatever decoder `tokenizer.json` names.
    HuggingFace,
}

/// A tokenizer with its special tokens and chat template.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pieces: Pieces,
    /// Token text by id, as stored in the file (byte-level or `▁` form).
    tokens: Vec<String>,
    types: Vec<TokenType>,
    bos: Option<u32>,
    eos: Option<u32>,
    /// Every id that ends generation, sorted.
    eos_ids: Vec<u32>,
    add_bos: bool,
    add_eos: bool,
    chat_template: Option<String>,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("pieces", &self.pieces)
            .field("n_vocab", &self.tokens.len())
            .field("bos", &self.bos)
            .field("eos_ids", &self.eos_ids)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

impl Tokenizer {
    /// Builds the tokenizer that GGUF metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`)
    /// describes.
    pub fn from_gguf_metadata(md: &[(String, Value)]) -> Result<Tokenizer> {
        let model = get_str(md, "tokenizer.ggml.model")?
            .ok_or_else(|| anyhow!("metadata has no tokenizer.ggml.model"))?;
        let mut tokens = get_string_array(md, "tokenizer.ggml.tokens")?
            .ok_or_else(|| anyhow!("metadata has no tokenizer.ggml.tokens"))?;
        if tokens.is_empty() {
            bail!("tokenizer.ggml.tokens is empty");
        }
        if tokens.len() > MAX_N_VOCAB {
            bail!(
                "tokenizer.ggml.tokens has {} entries, more than ids can number",
                tokens.len()
            );
        }
        let n_vocab = tokens.len();
        // llama.cpp renames empty tokens so that every text maps back to one id.
        for (id, text) in tokens.iter_mut().enumerate() {
            if text.is_empty() {
                *text = format!("[EMPTY_{id}]");
            }
        }
        let mut types = match get_array(md, "tokenizer.ggml.token_type")? {
            None => vec![TokenType::Normal; n_vocab],
            Some(values) => {
                if values.len() != n_vocab {
                    bail!(
                        "tokenizer.ggml.token_type has {} entries for {} tokens",
                        values.len(),
                        n_vocab
                    );
                }
                values
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        value_i64(v).map(TokenType::from_code).ok_or_else(|| {
                            anyhow!(
                                "tokenizer.ggml.token_type[{i}]: expected an integer, found {}",
                                kind(v)
                            )
                        })
                    })
                    .collect::<Result<Vec<_>>>()?
            }
        };
        // Text to id; a repeated text maps to its last id, as llama.cpp's `token_to_id`.
        let ids_by_text: HashMap<&str, u32> = tokens
            .iter()
            .enumerate()
            .map(|(id, t)| (t.as_str(), id as u32))
            .collect();

        let is_spm = match model {
            "llama" => true,
            "gpt2" => false,
            other => bail!("unsupported tokenizer model '{other}' (supported: gpt2, llama)"),
        };
        let pre_name = get_str(md, "tokenizer.ggml.pre")?.unwrap_or("default");
        let pre = if is_spm {
            None
        } else {
            Some(pre_spec(pre_name).ok_or_else(|| {
                anyhow!(
                    "unknown tokenizer.ggml.pre '{pre_name}' (known: {})",
                    KNOWN_PRE.join(", ")
                )
            })?)
        };

        let special_id = |key: &str, default: Option<u32>| -> Result<Option<u32>> {
            match get_u32(md, key)? {
                Some(id) if (id as usize) < n_vocab => Ok(Some(id)),
                Some(id) => bail!("{key} = {id} is outside the vocabulary of {n_vocab} tokens"),
                None => Ok(default.filter(|&id| (id as usize) < n_vocab)),
            }
        };
        // llama.cpp's defaults: SentencePiece <unk>=0, <s>=1, </s>=2; GPT-2 BPE 11 for both.
        let (default_bos, default_eos) = if is_spm { (1, 2) } else { (11, 11) };
        let bos = special_id("tokenizer.ggml.bos_token_id", Some(default_bos))?;
        let eos = special_id("tokenizer.ggml.eos_token_id", Some(default_eos))?;
        let unk = special_id(
            "tokenizer.ggml.unknown_token_id",
            if is_spm { Some(0) } else { None },
        )?;
        let eot = special_id("tokenizer.ggml.eot_token_id", None)?;
        let eom = special_id("tokenizer.ggml.eom_token_id", None)?;
        let fim = [
            special_id("tokenizer.ggml.fim_pad_token_id", None)?,
            special_id("tokenizer.ggml.fim_rep_token_id", None)?,
            special_id("tokenizer.ggml.fim_sep_token_id", None)?,
        ];
        let eos_ids = end_of_generation_ids(&ids_by_text, &mut types, eos, eot, eom, fim);

        let add_bos = get_bool(md, "tokenizer.ggml.add_bos_token")?
            .unwrap_or(is_spm || pre.as_ref().is_some_and(|p| p.add_bos));
        let add_eos = get_bool(md, "tokenizer.ggml.add_eos_token")?.unwrap_or(false);
        if add_bos && bos.is_none() {
            bail!("the tokenizer adds a BOS token but has no valid tokenizer.ggml.bos_token_id");
        }
        if add_eos && eos.is_none() {
            bail!("the tokenizer adds an EOS token but has no valid tokenizer.ggml.eos_token_id");
        }
        let chat_template = get_str(md, "tokenizer.chat_template")?.map(str::to_owned);

        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(id, t)| (t.clone(), id as u32))
            .collect();
        let (mut inner, pieces) = match pre {
            None => {
                let add_space_prefix =
                    get_bool(md, "tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
                let scores = match get_array(md, "tokenizer.ggml.scores")? {
                    None => vec![0.0; n_vocab],
                    Some(values) => {
                        if values.len() != n_vocab {
                            bail!(
                                "tokenizer.ggml.scores has {} entries for {} tokens",
                                values.len(),
                                n_vocab
                            );
                        }
                        values
                            .iter()
                            .enumerate()
                            .map(|(i, v)| {
                                value_f32(v).ok_or_else(|| {
                                    anyhow!(
                                        "tokenizer.ggml.scores[{i}]: expected a number, found {}",
                                        kind(v)
                                    )
                                })
                            })
                            .collect::<Result<Vec<_>>>()?
                    }
                };
                let merges = sentencepiece_merges(&tokens, &scores, &ids_by_text);
                let mut builder = BPE::builder()
                    .vocab_and_merges(vocab, merges)
                    .byte_fallback(true);
                if let Some(unk) = unk {
                    builder = builder
                        .unk_token(tokens[unk as usize].clone())
                        .fuse_unk(true);
                }
                let bpe = builder
                    .build()
                    .map_err(|e| anyhow!("building the SentencePiece BPE: {e}"))?;
                let mut inner = tokenizers::Tokenizer::new(bpe);
                // llama.cpp prepends a space to every stretch of text that starts the input or
                // follows a special token, then writes spaces as `▁`; normalizers run on exactly
                // those stretches.
                let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
                if add_space_prefix {
                    normalizers.push(Prepend::new(SPM_SPACE.to_string()).into());
                }
                normalizers.push(
                    Replace::new(" ", SPM_SPACE.to_string())
                        .map_err(|e| anyhow!("building the whitespace normalizer: {e}"))?
                        .into(),
                );
                inner
                    .with_normalizer(Some(NormalizerSequence::new(normalizers)))
                    .map_err(|e| anyhow!("setting the normalizer: {e}"))?;
                (
                    inner,
                    Pieces::SentencePiece {
                        strip_leading_space: add_space_prefix,
                    },
                )
            }
            Some(pre) => {
                let merges = bpe_merges(md, &vocab)?;
                let bpe = BPE::builder()
                    .vocab_and_merges(vocab, merges)
                    .ignore_merges(pre.ignore_merges)
                    .build()
                    .map_err(|e| anyhow!("building the byte-level BPE: {e}"))?;
                let mut inner = tokenizers::Tokenizer::new(bpe);
                let mut steps: Vec<PreTokenizerWrapper> = Vec::new();
                for regex in pre.regexes {
                    let split = Split::new(
                        SplitPattern::Regex((*regex).to_owned()),
                        SplitDelimiterBehavior::Isolated,
                        false,
                    )
                    .map_err(|e| anyhow!("pre-tokenizer regex {regex:?}: {e}"))?;
                    steps.push(split.into());
                }
                steps.push(ByteLevel::new(false, false, false).into());
                inner.with_pre_tokenizer(Some(PreTokenizerSequence::new(steps)));
                (inner, Pieces::ByteLevel)
            }
        };

        let added: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, ty)| ty.is_added())
            .map(|(text, ty)| {
                AddedToken::from(text.clone(), *ty != TokenType::UserDefined).normalized(false)
            })
            .collect();
        inner
            .add_tokens(added)
            .map_err(|e| anyhow!("registering special tokens: {e}"))?;

        Ok(Tokenizer {
            inner,
            pieces,
            tokens,
            types,
            bos,
            eos,
            eos_ids,
            add_bos,
            add_eos,
            chat_template,
        })
    }

    /// Builds the tokenizer of a Hugging Face model directory's files. BOS, EOS, `add_bos_token`,
    /// `add_eos_token` and the chat template come from `tokenizer_config.json`; the
    /// `eos_token_id` of `generation_config.json` (one id or a list) joins the EOS set.
    pub fn from_files(
        tokenizer_json: &Path,
        tokenizer_config_json: Option<&Path>,
        generation_config_json: Option<&Path>,
    ) -> Result<Tokenizer> {
        let inner = tokenizers::Tokenizer::from_file(tokenizer_json)
            .map_err(|e| anyhow!("{}: {e}", tokenizer_json.display()))?;
        let vocab = inner.get_vocab(true);
        let n_vocab = vocab.values().map(|&id| id as usize + 1).max().unwrap_or(0);
        if n_vocab == 0 {
            bail!("{}: the vocabulary is empty", tokenizer_json.display());
        }
        if n_vocab > vocab.len().saturating_mul(2).max(1 << 16) {
            bail!(
                "{}: token ids reach {} for {} tokens",
                tokenizer_json.display(),
                n_vocab - 1,
                vocab.len()
            );
        }
        let mut tokens = vec![String::new(); n_vocab];
        let mut types = vec![TokenType::Undefined; n_vocab];
        for (text, id) in vocab {
            types[id as usize] = TokenType::Normal;
            tokens[id as usize] = text;
        }
        for (id, token) in inner.get_added_tokens_decoder() {
            if let Some(ty) = types.get_mut(id as usize) {
                *ty = if token.special {
                    TokenType::Control
                } else {
                    TokenType::UserDefined
                };
            }
        }

        let config = match tokenizer_config_json {
            Some(path) => Some(read_json(path)?),
            None => None,
        };
        let generation = match generation_config_json {
            Some(path) => Some(read_json(path)?),
            None => None,
        };
        let token_id = |field: &str| -> Result<Option<u32>> {
            let Some(config) = &config else {
                return Ok(None);
            };
            let text = match config.get(field) {
                None | Some(serde_json::Value::Null) => return Ok(None),
                Some(serde_json::Value::String(s)) => s.as_str(),
                Some(v) => match v.get("content").and_then(|c| c.as_str()) {
                    Some(s) => s,
                    None => bail!("tokenizer_config.json: {field} is neither a string nor {{\"content\": ...}}"),
                },
            };
            inner.token_to_id(text).map(Some).ok_or_else(|| {
                anyhow!("tokenizer_config.json: {field} {text:?} is not in the vocabulary")
            })
        };
        let config_bool = |field: &str| {
            config
                .as_ref()
                .and_then(|c| c.get(field))
                .and_then(|v| v.as_bool())
        };
        let generation_ids = |field: &str| -> Result<Vec<u32>> {
            let Some(generation) = &generation else {
                return Ok(Vec::new());
            };
            let values = match generation.get(field) {
                None | Some(serde_json::Value::Null) => return Ok(Vec::new()),
                Some(serde_json::Value::Array(a)) => a.clone(),
                Some(v) => vec![v.clone()],
            };
            values
                .iter()
                .map(|v| match v.as_u64() {
                    Some(id) if (id as usize) < n_vocab => Ok(id as u32),
                    _ => bail!("generation_config.json: {field} has {v}, not a token id"),
                })
                .collect()
        };

        let bos = match token_id("bos_token")? {
            Some(id) => Some(id),
            None => generation_ids("bos_token_id")?.first().copied(),
        };
        let mut eos = token_id("eos_token")?;
        let generation_eos = generation_ids("eos_token_id")?;
        if eos.is_none() {
            eos = generation_eos.first().copied();
        }
        let mut eos_ids: Vec<u32> = eos.into_iter().chain(generation_eos).collect();
        eos_ids.sort_unstable();
        eos_ids.dedup();
        let add_bos = config_bool("add_bos_token").unwrap_or(false) && bos.is_some();
        let add_eos = config_bool("add_eos_token").unwrap_or(false) && eos.is_some();

        let chat_template = match config.as_ref().and_then(|c| c.get("chat_template")) {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(named)) => {
                let template_of = |entry: &serde_json::Value| {
                    entry
                        .get("template")
                        .and_then(|t| t.as_str())
                        .map(str::to_owned)
                };
                named
                    .iter()
                    .find(|e| e.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(template_of)
                    .or_else(|| named.first().and_then(template_of))
            }
            Some(_) => bail!("tokenizer_config.json: chat_template is neither a string nor a list"),
        };

        Ok(Tokenizer {
            inner,
            pieces: Pieces::HuggingFace,
            tokens,
            types,
            bos,
            eos,
            eos_ids,
            add_bos,
            add_eos,
            chat_template,
        })
    }

    /// [`Tokenizer::from_files`] on a directory's `tokenizer.json`, and its
    /// `tokenizer_config.json` and `generation_config.json` where present.
    pub fn from_hf_dir(dir: &Path) -> Result<Tokenizer> {
        let config = dir.join("tokenizer_config.json");
        let generation = dir.join("generation_config.json");
        Tokenizer::from_files(
            &dir.join("tokenizer.json"),
            config.is_file().then_some(config.as_path()),
            generation.is_file().then_some(generation.as_path()),
        )
    }

    /// Token ids of `text`. Special-token text in the input (`<|im_start|>`) becomes that token.
    /// With `add_special`, BOS (and EOS) are added where the model's files say so.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, add_special)
            .map_err(|e| anyhow!("tokenizing: {e}"))?;
        let mut ids = encoding.get_ids().to_vec();
        if add_special {
            // A tokenizer.json's post-processor may have added them already. GGUF tokenizers have
            // none, and add BOS even before a BOS of the text, as llama.cpp does.
            let post_processed = self.pieces == Pieces::HuggingFace;
            if let (true, Some(bos)) = (self.add_bos, self.bos) {
                if !(post_processed && ids.first() == Some(&bos)) {
                    ids.insert(0, bos);
                }
            }
            if let (true, Some(eos)) = (self.add_eos, self.eos) {
                if !(post_processed && ids.last() == Some(&eos)) {
                    ids.push(eos);
                }
            }
        }
        Ok(ids)
    }

    /// The text of `ids`; special tokens render as their text.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        for &id in ids {
            self.check_id(id)?;
        }
        match self.pieces {
            Pieces::HuggingFace => self
                .inner
                .decode(ids, false)
                .map_err(|e| anyhow!("decoding: {e}")),
            Pieces::ByteLevel | Pieces::SentencePiece { .. } => {
                let mut bytes = Vec::new();
                for &id in ids {
                    self.push_piece(id, &mut bytes);
                }
                // llama.cpp's detokenizer takes one leading space off the first token's piece,
                // the space the encoder put in front of the text.
                let strip = matches!(
                    self.pieces,
                    Pieces::SentencePiece {
                        strip_leading_space: true
                    }
                );
                if let (true, Some(&first)) = (strip, ids.first()) {
                    let mut piece = Vec::new();
                    self.push_piece(first, &mut piece);
                    if piece.first() == Some(&b' ') {
                        bytes.remove(0);
                    }
                }
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
        }
    }

    /// The bytes one token stands for (llama.cpp's `token_to_piece` with specials rendered).
    fn push_piece(&self, id: u32, out: &mut Vec<u8>) {
        let text = &self.tokens[id as usize];
        match (self.types[id as usize], self.pieces) {
            (TokenType::Control | TokenType::Unknown | TokenType::UserDefined, _) => {
                out.extend_from_slice(text.as_bytes())
            }
            (TokenType::Normal, Pieces::ByteLevel) => {
                for c in text.chars() {
                    match char_to_byte(c) {
                        Some(b) => out.push(b),
                        None => {
                            let mut buf = [0u8; 4];
                            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                        }
                    }
                }
            }
            (TokenType::Normal, _) => {
                for c in text.chars() {
                    let c = if c == SPM_SPACE { ' ' } else { c };
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
            }
            (TokenType::Byte, Pieces::SentencePiece { .. }) => match parse_byte_token(text) {
                Some(b) => out.push(b),
                None => out.extend_from_slice(text.as_bytes()),
            },
            _ => {}
        }
    }

    fn check_id(&self, id: u32) -> Result<()> {
        if (id as usize) < self.tokens.len() {
            Ok(())
        } else {
            bail!(
                "token id {id} is outside the vocabulary of {} tokens",
                self.tokens.len()
            )
        }
    }

    pub fn n_vocab(&self) -> usize {
        self.tokens.len()
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// The EOS token the files name (the one a chat template's `eos_token` is).
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// Every token that ends generation: EOS, EOT and EOM, and for GGUF files the tokens that
    /// llama.cpp also treats as end of generation by their text (`<|im_end|>`, `<|endoftext|>`,
    /// `<|eot_id|>`, FIM padding and separators, ...). Sorted.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_ids.binary_search(&id).is_ok()
    }

    /// Whether `encode(_, true)` prepends BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether `encode(_, true)` appends EOS.
    pub fn add_eos(&self) -> bool {
        self.add_eos
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// A token's text as the vocabulary stores it (`Ġthe`, `▁the`, `<|im_end|>`).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.types.get(id as usize).copied()
    }

    /// The id of a token given its vocabulary text.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.inner.token_to_id(text)
    }

    /// The chat prompt for `messages`: the model's chat template (ChatML when it has none)
    /// rendered with this tokenizer's BOS and EOS texts.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let text_of = |id: Option<u32>| id.and_then(|id| self.token_text(id)).unwrap_or("");
        apply_chat_template(
            template_or_default(self.chat_template()),
            messages,
            add_generation_prompt,
            text_of(self.bos),
            text_of(self.eos),
        )
    }

    /// A decoder for a stream of new tokens that starts a text.
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder::new(self)
    }
}

/// Turns token ids fed one at a time into text as soon as it is complete: a character split
/// across byte tokens waits for its last byte, and the text of each step is what the whole
/// sequence decodes to beyond what was already returned, so the concatenation of all steps and
/// [`StreamDecoder::finish`] equals [`Tokenizer::decode`] of all ids.
///
/// It keeps a short window of ids: those of the last returned piece (their text is the prefix)
/// and those not returned yet.
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    /// How many of `ids` were already returned.
    n_done: usize,
    /// `decode(ids[..n_done])`.
    prefix: String,
}

/// Tokens of context kept by [`StreamDecoder::with_context`]: enough for a character of up to
/// four byte tokens.
const STREAM_CONTEXT_TOKENS: usize = 4;

/// Tokens held back at most: a run of bytes that never forms a character (U+FFFD) is let out
/// after this many rather than decoded again at every step.
const STREAM_MAX_PENDING_TOKENS: usize = 16;

impl<'a> StreamDecoder<'a> {
    pub fn new(tokenizer: &'a Tokenizer) -> StreamDecoder<'a> {
        StreamDecoder {
            tokenizer,
            ids: Vec::new(),
            n_done: 0,
            prefix: String::new(),
        }
    }

    /// A decoder for tokens that continue `context` (a prompt): the text returned is what the
    /// new tokens add to `decode(context)`, so a SentencePiece word keeps its leading space.
    pub fn with_context(tokenizer: &'a Tokenizer, context: &[u32]) -> Result<StreamDecoder<'a>> {
        let ids = context[context.len().saturating_sub(STREAM_CONTEXT_TOKENS)..].to_vec();
        let prefix = tokenizer.decode(&ids)?;
        Ok(StreamDecoder {
            tokenizer,
            n_done: ids.len(),
            ids,
            prefix,
        })
    }

    /// Feeds one id; returns the text that became complete (often empty).
    pub fn step(&mut self, id: u32) -> Result<String> {
        self.tokenizer.check_id(id)?;
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids)?;
        let incomplete =
            text.len() <= self.prefix.len() || text.ends_with(char::REPLACEMENT_CHARACTER);
        if incomplete && self.ids.len() - self.n_done < STREAM_MAX_PENDING_TOKENS {
            return Ok(String::new());
        }
        let new = text[common_prefix_len(&text, &self.prefix)..].to_owned();
        self.ids.drain(..self.n_done);
        self.n_done = self.ids.len();
        self.prefix = self.tokenizer.decode(&self.ids)?;
        Ok(new)
    }

    /// Returns whatever is pending (an incomplete character becomes U+FFFD) and empties the
    /// decoder.
    pub fn finish(&mut self) -> Result<String> {
        let text = self.tokenizer.decode(&self.ids)?;
        let rest = text[common_prefix_len(&text, &self.prefix)..].to_owned();
        self.ids.clear();
        self.n_done = 0;
        self.prefix.clear();
        Ok(rest)
    }
}

/// Length in bytes of the longest common prefix of `a` and `b` that ends on a char boundary.
fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, ca), cb)| ca != cb)
        .map(|((i, _), _)| i)
        .unwrap_or_else(|| a.len().min(b.len()))
}

/// Texts that llama.cpp treats as end of generation (`special_eog_ids`), and as EOT when the
/// metadata names none.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
];
const EOT_ONLY_TEXT: &str = "<\u{ff5c}end\u{2581}of\u{2581}sentence\u{ff5c}>";
const FIM_PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>"];
const FIM_REP_TEXTS: &[&str] = &[
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
];
const FIM_SEP_TEXTS: &[&str] = &["<|file_sep|>"];
/// FIM tokens llama.cpp forces to control type without making them end generation.
const FIM_OTHER_TEXTS: &[&str] = &[
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<\u{ff5c}fim\u{2581}begin\u{ff5c}>",
    "<PRE>",
    "\u{2581}<PRE>",
    "<|code_prefix|>",
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<\u{ff5c}fim\u{2581}hole\u{ff5c}>",
    "<SUF>",
    "\u{2581}<SUF>",
    "<|code_suffix|>",
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<\u{ff5c}fim\u{2581}end\u{ff5c}>",
    "<MID>",
    "\u{2581}<MID>",
    "<|code_middle|>",
];

/// llama.cpp's end-of-generation set, built as `llama_vocab::impl::load` builds it; tokens it
/// recognises by text become control tokens, as there.
fn end_of_generation_ids(
    ids_by_text: &HashMap<&str, u32>,
    types: &mut [TokenType],
    eos: Option<u32>,
    eot: Option<u32>,
    eom: Option<u32>,
    fim: [Option<u32>; 3],
) -> Vec<u32> {
    let find = |texts: &[&str]| {
        texts
            .iter()
            .filter_map(|t| ids_by_text.get(t).copied())
            .collect::<Vec<_>>()
    };
    let mut control: Vec<u32> = find(FIM_OTHER_TEXTS);
    let mut eog: Vec<u32> = Vec::new();
    for (given, texts) in fim
        .iter()
        .zip([FIM_PAD_TEXTS, FIM_REP_TEXTS, FIM_SEP_TEXTS])
    {
        match given {
            Some(id) => eog.push(*id),
            None => {
                let found = find(texts);
                control.extend(&found);
                eog.extend(found.first());
            }
        }
    }
    let by_text = find(EOG_TEXTS);
    control.extend(&by_text);
    eog.extend(&by_text);
    if eot.is_none() {
        if let Some(&id) = ids_by_text.get(EOT_ONLY_TEXT) {
            control.push(id);
            eog.push(id);
        }
    }
    eog.extend(eos.into_iter().chain(eot).chain(eom));
    for id in control {
        types[id as usize] = TokenType::Control;
    }
    // gpt-oss: with both <|return|> and <|call|>, <|end|> is no end of generation.
    if ["<|return|>", "<|call|>"]
        .iter()
        .all(|t| ids_by_text.contains_key(t))
    {
        if let Some(&end) = ids_by_text.get("<|end|>") {
            eog.retain(|&id| id != end);
        }
    }
    eog.sort_unstable();
    eog.dedup();
    eog
}

/// Merges for a byte-level BPE from `tokenizer.ggml.merges` ("left right", split at the first
/// space after the first byte, as llama.cpp does). A merge whose parts or union are not tokens can
/// never apply to a vocabulary token and is left out; ranks keep the file's order.
fn bpe_merges(md: &[(String, Value)], vocab: &Vocab) -> Result<Vec<(String, String)>> {
    let merges = get_string_array(md, "tokenizer.ggml.merges")?
        .ok_or_else(|| anyhow!("metadata has no tokenizer.ggml.merges (needed for model gpt2)"))?;
    let mut out = Vec::with_capacity(merges.len());
    for merge in merges {
        let first_len = merge.chars().next().map_or(0, char::len_utf8);
        let Some(pos) = merge[first_len..].find(' ').map(|p| p + first_len) else {
            continue;
        };
        let (left, right) = (&merge[..pos], &merge[pos + 1..]);
        if vocab.contains_key(left)
            && vocab.contains_key(right)
            && vocab.contains_key(&format!("{left}{right}"))
        {
            out.push((left.to_owned(), right.to_owned()));
        }
    }
    Ok(out)
}

/// BPE merges that make a BPE tokenize as SentencePiece does, derived as Hugging Face's
/// `SentencePieceExtractor` derives them: every split of every token into two tokens, ordered by
/// the score of the token they form (best first; a stable sort, so ties keep vocabulary order),
/// and within one token by the ids of the parts.
fn sentencepiece_merges(
    tokens: &[String],
    scores: &[f32],
    ids_by_text: &HashMap<&str, u32>,
) -> Vec<(String, String)> {
    let mut merges: Vec<(f32, u32, u32)> = Vec::new();
    for (id, text) in tokens.iter().enumerate() {
        if ids_by_text.get(text.as_str()) != Some(&(id as u32)) {
            continue;
        }
        let start = merges.len();
        for (split, _) in text.char_indices().skip(1) {
            if let (Some(&left), Some(&right)) = (
                ids_by_text.get(&text[..split]),
                ids_by_text.get(&text[split..]),
            ) {
                merges.push((scores[id], left, right));
            }
        }
        merges[start..].sort_by_key(|&(_, left, right)| (left, right));
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0));
    merges
        .into_iter()
        .map(|(_, left, right)| {
            (
                tokens[left as usize].clone(),
                tokens[right as usize].clone(),
            )
        })
        .collect()
}

/// `<0xNN>` to its byte.
fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// A byte-level BPE pre-tokenizer as llama.cpp configures it for one `tokenizer.ggml.pre`.
struct PreSpec {
    /// Applied in order, each splitting the pieces the previous one left.
    regexes: &'static [&'static str],
    /// A word that is itself a token is not merged (llama.cpp's `ignore_merges`).
    ignore_merges: bool,
    /// llama.cpp's default for `add_bos` when the metadata does not say.
    add_bos: bool,
}

const GPT2_REGEX: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const PORO_REGEX: &str = r" ?[^(\s|.,!?…。，、।۔،)]+";

const PRE_DEFAULT: &[&str] = &[
    r"[\p{P}\$\+<=>\^~\|]+",
    GPT2_REGEX,
    r"\p{N}+",
    r"[0-9][0-9][0-9]",
];
const PRE_FALCON: &[&str] = &[r"[\p{P}\$\+<=>\^~\|`]+", GPT2_REGEX, r"[0-9][0-9][0-9]"];
const PRE_GPT2: &[&str] = &[GPT2_REGEX];
const PRE_DIGITS_GPT2: &[&str] = &[r"\p{N}", GPT2_REGEX];
const PRE_LLAMA3: &[&str] = &[LLAMA3_REGEX];
const PRE_QWEN2: &[&str] = &[QWEN2_REGEX];
const PRE_PORO: &[&str] = &[PORO_REGEX];
const PRE_VIKING: &[&str] = &[PORO_REGEX, r"\p{N}"];

const PRE_LLAMA3_NAMES: &[&str] = &[
    "llama3",
    "llama-v3",
    "llama-bpe",
    "falcon3",
    "falcon-h1",
    "pixtral",
    "midm-2.0",
    "lfm2",
];
const PRE_GPT2_NAMES: &[&str] = &[
    "gpt-2",
    "phi-2",
    "jina-es",
    "jina-de",
    "gigachat",
    "jina-v2-es",
    "jina-v2-de",
    "a.x-4.0",
    "mellum",
    "mpt",
    "olmo",
    "jais",
    "exaone4",
    "trillion",
    "granite-docling",
];
const PRE_DIGITS_GPT2_NAMES: &[&str] = &[
    "smollm",
    "starcoder",
    "refact",
    "command-r",
    "codeshell",
    "exaone",
    "minerva-7b",
];
const PRE_QWEN2_NAMES: &[&str] = &[
    "qwen2",
    "deepseek-r1-qwen",
    "kormo",
    "megrez",
    "stablelm2",
    "hunyuan",
];

/// Every `tokenizer.ggml.pre` this tokenizer knows, for error messages.
const KNOWN_PRE: &[&str] = &[
    "default",
    "llama3",
    "llama-v3",
    "llama-bpe",
    "falcon3",
    "falcon-h1",
    "pixtral",
    "midm-2.0",
    "lfm2",
    "dbrx",
    "smaug-bpe",
    "gpt-2",
    "phi-2",
    "jina-es",
    "jina-de",
    "gigachat",
    "jina-v2-es",
    "jina-v2-de",
    "a.x-4.0",
    "mellum",
    "mpt",
    "olmo",
    "jais",
    "exaone4",
    "trillion",
    "granite-docling",
    "smollm",
    "starcoder",
    "refact",
    "command-r",
    "codeshell",
    "exaone",
    "minerva-7b",
    "qwen2",
    "deepseek-r1-qwen",
    "kormo",
    "megrez",
    "stablelm2",
    "hunyuan",
    "falcon",
    "poro-chat",
    "bloom",
    "gpt3-finnish",
    "viking",
];

fn pre_spec(name: &str) -> Option<PreSpec> {
    let spec = |regexes, ignore_merges, add_bos| {
        Some(PreSpec {
            regexes,
            ignore_merges,
            add_bos,
        })
    };
    if PRE_LLAMA3_NAMES.contains(&name) {
        return spec(PRE_LLAMA3, true, true);
    }
    if PRE_GPT2_NAMES.contains(&name) {
        return spec(PRE_GPT2, false, false);
    }
    if PRE_DIGITS_GPT2_NAMES.contains(&name) {
        return spec(PRE_DIGITS_GPT2, false, false);
    }
    if PRE_QWEN2_NAMES.contains(&name) {
        return spec(PRE_QWEN2, false, false);
    }
    match name {
        "default" => spec(PRE_DEFAULT, false, false),
        "dbrx" | "smaug-bpe" => spec(PRE_LLAMA3, false, false),
        "falcon" => spec(PRE_FALCON, false, false),
        "poro-chat" | "bloom" | "gpt3-finnish" => spec(PRE_PORO, false, false),
        "viking" => spec(PRE_VIKING, false, false),
        _ => None,
    }
}

/// GPT-2's printable stand-in for every byte: printable Latin-1 bytes stand for themselves, the
/// others map in order to U+0100 onwards.
const BYTE_TO_CHAR: [char; 256] = byte_to_char_table();

const fn is_printable_byte(b: u32) -> bool {
    (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff)
}

const fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    let mut b = 0u32;
    while b < 256 {
        let code = if is_printable_byte(b) {
            b
        } else {
            n += 1;
            255 + n
        };
        table[b as usize] = match char::from_u32(code) {
            Some(c) => c,
            None => char::REPLACEMENT_CHARACTER,
        };
        b += 1;
    }
    table
}

/// The byte each GPT-2 byte-level character stands for, by code point (-1: none).
const CHAR_TO_BYTE: [i16; 324] = char_to_byte_table();

const fn char_to_byte_table() -> [i16; 324] {
    let mut table = [-1i16; 324];
    let mut b = 0;
    while b < 256 {
        let code = BYTE_TO_CHAR[b] as usize;
        if code < table.len() {
            table[code] = b as i16;
        }
        b += 1;
    }
    table
}

/// The byte a GPT-2 byte-level character stands for.
fn char_to_byte(c: char) -> Option<u8> {
    CHAR_TO_BYTE
        .get(c as usize)
        .and_then(|&b| u8::try_from(b).ok())
}

/// Control tokens of the synthetic vocabulary, ids 0, 1, 2 (as in SmolLM2: BOS is
/// `<|im_start|>`, EOS `<|im_end|>`).
const SYNTHETIC_CONTROL: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// Words merged first (rank order) in the synthetic vocabulary, most frequent English words.
const SYNTHETIC_WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by",
    "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an",
    "they", "you", "were", "her", "she", "there", "been", "one", "all", "we", "their", "has",
    "would", "when", "if", "so", "no", "will", "more", "can", "who", "out", "up", "said", "about",
    "other", "into", "some", "what", "could", "time", "than", "its", "only", "new", "them",
    "these", "two", "may", "first", "then", "do", "any", "like", "my", "now", "over", "such",
    "our", "man", "me", "even", "most", "made", "after", "also", "did", "many", "before", "must",
    "through", "years", "where", "much", "your", "way", "down", "should", "because", "each",
    "just", "those", "people", "how", "too", "little", "state", "good", "very", "make", "world",
    "still", "own", "see", "men", "work", "long", "get", "here", "between", "both", "life",
    "being", "under", "never", "day", "same", "another", "know", "while", "last", "might", "us",
    "great", "old", "year", "off", "come", "since", "against", "go", "came", "right", "used",
    "take", "three", "quick", "brown", "fox", "jumps", "lazy", "dog", "capital", "France", "Paris",
    "question", "answer", "number", "water", "city", "house", "school", "The", "It", "In", "This",
    "He", "She", "We", "They", "I", "A", "There", "What", "How", "ing", "tion", "ed", "ly", "er",
    "es", "ent", "al", "ation",
];

/// Letters by frequency in English, the order the synthetic merges extend tokens in.
const SYNTHETIC_LETTERS: &str = "etaoinshrdlcumwfgypbvkjxqz";

/// Largest synthetic vocabulary: far above any real model's (262,144 for Gemma 3).
const SYNTHETIC_MAX_N_VOCAB: usize = 1 << 20;

/// The synthetic vocabulary while it is being built.
struct SyntheticBpe {
    n_vocab: usize,
    tokens: Vec<String>,
    known: HashSet<String>,
    /// Rank of each merge, by its pair.
    ranks: HashMap<(String, String), usize>,
    /// `"left right"`, in rank order.
    merges: Vec<String>,
}

impl SyntheticBpe {
    fn full(&self) -> bool {
        self.tokens.len() >= self.n_vocab
    }

    /// Adds the merge `left right` if it is new and the vocabulary is not full; the token it forms
    /// is added if new. With `existing_token` false, a merge whose token already exists is skipped.
    fn merge(&mut self, left: &str, right: &str, existing_token: bool) {
        if self.full() {
            return;
        }
        let pair = (left.to_owned(), right.to_owned());
        if self.ranks.contains_key(&pair) {
            return;
        }
        let joined = format!("{left}{right}");
        if self.known.contains(&joined) {
            if !existing_token {
                return;
            }
        } else {
            self.known.insert(joined.clone());
            self.tokens.push(joined);
        }
        self.merges.push(format!("{left} {right}"));
        self.ranks.insert(pair, self.ranks.len());
    }

    /// The pieces BPE with the merges so far splits a byte-level word into.
    fn segments(&self, word: &str) -> Vec<String> {
        let mut pieces: Vec<String> = word.chars().map(String::from).collect();
        loop {
            let best = pieces
                .windows(2)
                .enumerate()
                .filter_map(|(i, pair)| {
                    self.ranks
                        .get(&(pair[0].clone(), pair[1].clone()))
                        .map(|&rank| (rank, i))
                })
                .min();
            let Some((_, i)) = best else { return pieces };
            let right = pieces.remove(i + 1);
            pieces[i].push_str(&right);
        }
    }
}

/// GGUF tokenizer metadata for a byte-level BPE of exactly `n_vocab` tokens, for synthetic models
/// (`kvgear synth`): three control tokens (`<|endoftext|>`, `<|im_start|>` = BOS,
/// `<|im_end|>` = EOS), the 256 byte tokens in GPT-2's byte-to-unicode form (ids 3 to 258, in
/// byte order), then one token per merge. Merges come from a fixed rule: common English words
/// (bare and with a leading space) become single tokens, then every token of letters is extended
/// by one letter, breadth first with letters by frequency, until the vocabulary is full. Every
/// merge joins two tokens into a token of the vocabulary (a few words add a second merge for a
/// token that exists), every token text is distinct, and `pre` is `gpt-2`, so llama.cpp loads it.
/// The chat template is ChatML. Fewer than 259 or more than 2^20 tokens is an error.
pub fn synthetic_gpt2_metadata(n_vocab: usize) -> Result<Vec<(String, Value)>> {
    let n_fixed = SYNTHETIC_CONTROL.len() + 256;
    if n_vocab < n_fixed {
        bail!("a synthetic byte-level vocabulary needs at least {n_fixed} tokens, {n_vocab} asked");
    }
    if n_vocab > SYNTHETIC_MAX_N_VOCAB {
        bail!("a synthetic vocabulary of {n_vocab} tokens is over the limit of {SYNTHETIC_MAX_N_VOCAB}");
    }
    let mut bpe = SyntheticBpe {
        n_vocab,
        tokens: SYNTHETIC_CONTROL.iter().map(|s| s.to_string()).collect(),
        known: HashSet::new(),
        ranks: HashMap::new(),
        merges: Vec::new(),
    };
    bpe.tokens
        .extend(BYTE_TO_CHAR.iter().map(|c| c.to_string()));
    bpe.known = bpe.tokens.iter().cloned().collect();

    let space = BYTE_TO_CHAR[b' ' as usize].to_string();
    let newline = BYTE_TO_CHAR[b'\n' as usize].to_string();
    bpe.merge(&space, &space, false);
    bpe.merge(
        &format!("{space}{space}"),
        &format!("{space}{space}"),
        false,
    );
    bpe.merge(&newline, &newline, false);
    // Each word is first split as the merges so far split it; joining those pieces left to right
    // with merges ranked after all earlier ones makes the word a single token under BPE, whatever
    // merges come later.
    for word in SYNTHETIC_WORDS {
        for text in [format!("{space}{word}"), word.to_string()] {
            let mut pieces = bpe.segments(&text);
            while pieces.len() > 1 && !bpe.full() {
                let right = pieces.remove(1);
                bpe.merge(&pieces[0], &right, true);
                pieces[0].push_str(&right);
            }
        }
    }
    // Then breadth first from the space and the letters: each level is the previous one extended
    // by every letter, so each merge joins a token of the previous level and a letter token.
    let letters: Vec<String> = SYNTHETIC_LETTERS.chars().map(String::from).collect();
    let mut level: Vec<String> = std::iter::once(space.clone())
        .chain(letters.iter().cloned())
        .collect();
    while !bpe.full() {
        let mut next_level = Vec::new();
        for base in &level {
            for letter in &letters {
                bpe.merge(base, letter, false);
                next_level.push(format!("{base}{letter}"));
            }
            if bpe.full() {
                break;
            }
        }
        level = next_level;
    }
    let SyntheticBpe { tokens, merges, .. } = bpe;
    let mut types: Vec<i32> = vec![TokenType::Control.code(); SYNTHETIC_CONTROL.len()];
    types.resize(tokens.len(), TokenType::Normal.code());

    let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
    Ok(vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("gpt-2".into())),
        ("tokenizer.ggml.tokens".into(), strings(tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges".into(), strings(merges)),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.padding_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
        ("tokenizer.ggml.add_space_prefix".into(), Value::Bool(false)),
        (
            "tokenizer.chat_template".into(),
            Value::String(CHATML_TEMPLATE.into()),
        ),
    ])
}

/// The `tokenizer.ggml.pre` name llama.cpp gives a Hugging Face `Split` pre-tokenizer regex, for
/// the regexes kvgear's GGUF tokenizer implements (`kvgear quantize` of a safetensors model).
pub fn gguf_pre_for_regex(regex: &str) -> Option<&'static str> {
    match regex {
        LLAMA3_REGEX => Some("llama-bpe"),
        QWEN2_REGEX => Some("qwen2"),
        GPT2_REGEX => Some("gpt-2"),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn find<'a>(md: &'a [(String, Value)], key: &str) -> Option<&'a Value> {
    md.iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::U8(_) => "u8",
        Value::I8(_) => "i8",
        Value::U16(_) => "u16",
        Value::I16(_) => "i16",
        Value::U32(_) => "u32",
        Value::I32(_) => "i32",
        Value::U64(_) => "u64",
        Value::I64(_) => "i64",
        Value::F32(_) => "f32",
        Value::F64(_) => "f64",
        Value::Bool(_) => "bool",
        Value::String(_) => "string",
        Value::Array(_) => "array",
    }
}

fn value_i64(v: &Value) -> Option<i64> {
    match *v {
        Value::U8(x) => Some(x.into()),
        Value::I8(x) => Some(x.into()),
        Value::U16(x) => Some(x.into()),
        Value::I16(x) => Some(x.into()),
        Value::U32(x) => Some(x.into()),
        Value::I32(x) => Some(x.into()),
        Value::U64(x) => i64::try_from(x).ok(),
        Value::I64(x) => Some(x),
        _ => None,
    }
}

fn value_f32(v: &Value) -> Option<f32> {
    match *v {
        Value::F32(x) => Some(x),
        Value::F64(x) => Some(x as f32),
        _ => value_i64(v).map(|x| x as f32),
    }
}

fn get_str<'a>(md: &'a [(String, Value)], key: &str) -> Result<Option<&'a str>> {
    match find(md, key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => bail!("metadata {key}: expected a string, found {}", kind(v)),
    }
}

fn get_bool(md: &[(String, Value)], key: &str) -> Result<Option<bool>> {
    match find(md, key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => bail!("metadata {key}: expected a bool, found {}", kind(v)),
    }
}

fn get_u32(md: &[(String, Value)], key: &str) -> Result<Option<u32>> {
    match find(md, key) {
        None => Ok(None),
        Some(v) => match value_i64(v) {
            Some(x) => u32::try_from(x)
                .map(Some)
                .map_err(|_| anyhow!("metadata {key}: {x} is not a valid token id")),
            None => bail!("metadata {key}: expected an integer, found {}", kind(v)),
        },
    }
}

fn get_array<'a>(md: &'a [(String, Value)], key: &str) -> Result<Option<&'a [Value]>> {
    match find(md, key) {
        None => Ok(None),
        Some(Value::Array(a)) => Ok(Some(a)),
        Some(v) => bail!("metadata {key}: expected an array, found {}", kind(v)),
    }
}

fn get_string_array(md: &[(String, Value)], key: &str) -> Result<Option<Vec<String>>> {
    let Some(values) = get_array(md, key)? else {
        return Ok(None);
    };
    values
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) => Ok(s.clone()),
            other => bail!(
                "metadata {key}[{i}]: expected a string, found {}",
                kind(other)
            ),
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}
