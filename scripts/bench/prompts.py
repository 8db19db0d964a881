"""The prompts every benchmark sends (each request adds its index, so no two are identical)."""

PROMPTS = [
    "Explain why the sky is blue in simple words.",
    "Write a short poem about the sea and the wind.",
    "List three uses of a paperclip that are not about paper.",
    "What is the capital of France, and why is it famous?",
    "Describe a cat to someone who has never seen one.",
    "Give me a recipe for a quick breakfast with eggs.",
    "Why do people enjoy music? Answer in two sentences.",
    "Summarise the plot of a heist movie you would like to see.",
]
