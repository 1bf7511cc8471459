"""The course's labs in miniature: end-to-end experiments that train, evaluate and report (``llmjax lab ...``)."""
