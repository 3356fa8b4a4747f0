// Upper-cases its input string.
exports.main = async (blockInput, backpack) => {
  console.log(`shouting ${JSON.stringify(blockInput)}`);
  return String(blockInput).toUpperCase() + process.env.PUNCTUATION;
};
