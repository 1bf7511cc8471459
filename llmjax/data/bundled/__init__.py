"""Small data that llmjax ships or generates, so every stage runs without a download."""
