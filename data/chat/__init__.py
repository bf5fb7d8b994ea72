"""Chat data for supervised fine-tuning: ChatML conversations with a loss on the assistant's turns only.

format: the ChatML rendering, the markers on a tokenizer and one conversation's ids and assistant mask;
sources: conversations per domain (the generated math problems, local JSON Lines, a hub dataset);
build: data.chat=true's DataBundle (train/eval split, tokenizer, packing with labels, summary).
"""
