"""Speculative decoding: proposers draft tokens, the target model verifies them all in one step."""
