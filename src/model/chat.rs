//! Chat templates (Jinja, via minijinja).
