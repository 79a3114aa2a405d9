//! Hugging Face safetensors layout: config.json, tokenizer.json, one or several `*.safetensors`.
