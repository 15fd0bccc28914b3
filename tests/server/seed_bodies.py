"""Request bodies of the hosted endpoints' examples (shared/seeds), as their curl commands send them."""

SERVED_MODEL = "mistralai/Mistral-7B-Instruct-v0.2"

# DeepInfra, "Simple messages and prompts" (also the local-run page's body).
HELLO = """{
      "model": "mistralai/Mistral-7B-Instruct-v0.2",
      "messages": [
        {
          "role": "user",
          "content": "Hello!"
        }
      ]
    }"""

# DeepInfra, "Conversations" (the shell's '"'"' quoting already undone, as curl sends it). It names a
# model this server does not serve.
CONVERSATION = """{
      "model": "meta-llama/Meta-Llama-3-70B-Instruct",
      "messages": [
        {
            "role": "system",
            "content": "Respond like a michelin starred chef."
        },
        {
          "role": "user",
          "content": "Can you name at least two different techniques to cook lamb?"
        },
        {
          "role": "assistant",
          "content": "Bonjour! Let me tell you, my friend, cooking lamb is an art form, and I'm more than happy to share with you not two, but three of my favorite techniques to coax out the rich, unctuous flavors and tender textures of this majestic protein. First, we have the classic \\"Sous Vide\\" method. Next, we have the ancient art of \\"Sous le Sable\\". And finally, we have the more modern technique of \\"Hot Smoking.\\""
        },
        {
          "role": "user",
          "content": "Tell me more about the second method."
        }
      ]
    }"""

# DeepInfra, "Streaming".
STREAM = """{
      "model": "mistralai/Mistral-7B-Instruct-v0.2",
      "stream": true,
      "messages": [
        {
          "role": "user",
          "content": "Hello!"
        }
      ]
    }"""

# NVIDIA NIM's curl example, whose blanks are filled with the values its playground suggests.
SAMPLING = """{
"model": "mistralai/Mistral-7B-Instruct-v0.2",
"messages": [{"role":"user","content":"Write a limerick about the wonders of GPU computing."}],
"temperature": 0.2,
"top_p": 0.7,
"max_tokens": 5,
"stream": false
}"""
