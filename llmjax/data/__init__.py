"""Data: tokenizer, training objectives, packing and sources; ``bundled`` holds the data llmjax ships."""
