"""Answers: sampling solutions (`generate`), grading them with math-verify (`grade`), and on-policy step pairs
(`mine`)."""
