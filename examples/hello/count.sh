# Reads a JSON string on stdin, prints its word count as JSON.
input=$(cat)
echo "counting words of $input" >&2
printf '{"words": %s}' "$(printf '%s' "$input" | tr -d '"' | wc -w)"
